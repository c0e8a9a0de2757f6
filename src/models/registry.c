/* The model registry: names to constructors, and the generic model object. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "models/model_impl.h"
#include "models/zoo_blocks.h"

typedef struct {
    const char *name;
    kd_status (*build)(kd_model *m, const kd__arch_arg *arg, kd_rng *r);
    kd__arch_arg arg;
} kd__arch_row;

/* RepDistiller's CIFAR zoo (models/__init__.py model_dict: resnet.py, wrn.py,
 * vgg.py, mobilenetv2.py, ShuffleNetv1.py, ShuffleNetv2.py, resnetv2.py).
 * "MobileNetV2" and "mobile_half" are the same width-0.5 network: the
 * reference's model_dict used the first name, later the second. */
static const kd__arch_row kd__archs[] = {
    {"resnet8", kd__resnet_cifar_build, {8, {16, 16, 32, 64}}},
    {"resnet14", kd__resnet_cifar_build, {14, {16, 16, 32, 64}}},
    {"resnet20", kd__resnet_cifar_build, {20, {16, 16, 32, 64}}},
    {"resnet32", kd__resnet_cifar_build, {32, {16, 16, 32, 64}}},
    {"resnet44", kd__resnet_cifar_build, {44, {16, 16, 32, 64}}},
    {"resnet56", kd__resnet_cifar_build, {56, {16, 16, 32, 64}}},
    {"resnet110", kd__resnet_cifar_build, {110, {16, 16, 32, 64}}},
    {"resnet8x4", kd__resnet_cifar_build, {8, {32, 64, 128, 256}}},
    {"resnet32x4", kd__resnet_cifar_build, {32, {32, 64, 128, 256}}},
    {"wrn_16_1", kd__wrn_build, {16, {1}}},
    {"wrn_16_2", kd__wrn_build, {16, {2}}},
    {"wrn_40_1", kd__wrn_build, {40, {1}}},
    {"wrn_40_2", kd__wrn_build, {40, {2}}},
    {"vgg8", kd__vgg_build, {8, {0}}},
    {"vgg11", kd__vgg_build, {11, {0}}},
    {"vgg13", kd__vgg_build, {13, {0}}},
    {"vgg16", kd__vgg_build, {16, {0}}},
    {"vgg19", kd__vgg_build, {19, {0}}},
    {"MobileNetV2", kd__mobilenetv2_build, {0, {6, 50}}},
    {"mobile_half", kd__mobilenetv2_build, {0, {6, 50}}},
    {"ShuffleV1", kd__shufflev1_build, {0, {0}}},
    {"ShuffleV2", kd__shufflev2_build, {0, {0}}},
    {"ResNet50", kd__resnetv2_build, {50, {3, 4, 6, 3}}},
    /* torchvision's ImageNet models (resnet.py, mobilenetv3.py, efficientnet.py). */
    {"resnet18", kd__resnet_imagenet_build, {18, {2, 2, 2, 2}}},
    {"resnet34", kd__resnet_imagenet_build, {34, {3, 4, 6, 3}}},
    {"resnet50", kd__resnet_imagenet_build, {50, {3, 4, 6, 3}}},
    {"mobilenet_v3_large", kd__mobilenetv3_build, {0, {0}}},
    {"mobilenet_v3_small", kd__mobilenetv3_build, {1, {0}}},
    {"efficientnet_b0", kd__efficientnet_build, {0, {0}}},
    /* Swin Transformers (swin.c): torchvision's swin_t/s/b and two small ones. */
    {"swin_t", kd__swin_build, {0, {0}}},
    {"swin_s", kd__swin_build, {1, {0}}},
    {"swin_b", kd__swin_build, {2, {0}}},
    {"swin_cifar", kd__swin_build, {3, {0}}},
    {"swin_mnist", kd__swin_build, {4, {0}}},
};
#define KD__NARCH ((int)(sizeof kd__archs / sizeof kd__archs[0]))

const char *const *kd_model_names(int *n) {
    static const char *names[KD__NARCH];
    for (int i = 0; i < KD__NARCH; i++) names[i] = kd__archs[i].name;
    *n = KD__NARCH;
    return names;
}

static const kd__arch_row *kd__find_arch(const char *arch) {
    for (int i = 0; i < KD__NARCH; i++)
        if (strcmp(kd__archs[i].name, arch) == 0) return &kd__archs[i];
    return NULL;
}

int kd_model_exists(const char *arch) { return arch && kd__find_arch(arch) != NULL; }

/* The head layers of cfg.head_layers, named as KD__HEAD_SIMCLR names them
 * (src/distill/ssl.c): head.{3k} Linear(d, d, no bias), N(0, 0.01), and
 * head.{3k+1} BatchNorm1d(d). */
static kd_status kd__neck_init(kd_model *m, kd_rng *r) {
    const int64_t d = m->feat_dim;
    for (int k = 0; k < m->cfg.head_layers; k++) {
        char name[16];
        snprintf(name, sizeof name, "head.%d", 3 * k);
        KD_TRY(kd_linear_layer_init(&m->neck_lin[k], &m->params, name, d, d, 0));
        kd_init_normal(m->neck_lin[k].weight, 0.01f, r);
        snprintf(name, sizeof name, "head.%d", 3 * k + 1);
        KD_TRY(kd_bn_layer_init(&m->neck_bn[k], &m->params, name, d));
    }
    return KD_OK;
}

kd_tensor *kd__classify(kd_model *m, kd_graph *g, const kd_linear_layer *fc, kd_tensor *emb) {
    for (int k = 0; k < m->cfg.head_layers; k++)
        emb = kd_relu(g, kd_bn_layer_forward(g, &m->neck_bn[k],
                                             kd_linear_layer_forward(g, &m->neck_lin[k], emb), m->training));
    return kd_linear_layer_forward(g, fc, emb);
}

kd_status kd_model_create(const char *arch, const kd_model_cfg *cfg, kd_model **out) {
    *out = NULL;
    const kd__arch_row *row = arch ? kd__find_arch(arch) : NULL;
    if (!row) {
        char list[1024] = "";
        size_t off = 0;
        for (int i = 0; i < KD__NARCH && off < sizeof list; i++)
            off += (size_t)snprintf(list + off, sizeof list - off, "%s%s", i ? ", " : "", kd__archs[i].name);
        return kd_error(KD_ERR_NOT_FOUND, "unknown model '%s' (known: %s)", arch ? arch : "(null)", list);
    }
    if (cfg->in_channels < 1 || cfg->num_classes < 1)
        return kd_error(KD_ERR_INVALID, "model '%s': in_channels %d and num_classes %d must be >= 1",
                        arch, cfg->in_channels, cfg->num_classes);
    if (cfg->head_layers < 0 || cfg->head_layers > 2)
        return kd_error(KD_ERR_INVALID, "model '%s': head_layers (ft_proj_selector) %d must be 0, 1 or 2: "
                        "the classifier sits on the embedding or on the first one or two layers of the "
                        "SimCLRv2 projection head", arch, cfg->head_layers);
    kd_model *m = calloc(1, sizeof *m);
    if (!m) return kd_error(KD_ERR_NOMEM, "out of memory creating model '%s'", arch);
    snprintf(m->arch, sizeof m->arch, "%s", arch);
    m->cfg = *cfg;
    m->training = 1;
    kd_rng r;
    kd_rng_init(&r, cfg->seed, kd_rng_key(0x6d6f64656cull, 0)); /* "model" stream */
    kd_status s = row->build(m, &row->arg, &r);
    if (s == KD_OK) s = kd__neck_init(m, &r);
    if (s != KD_OK) {
        kd_model_free(m);
        return s;
    }
    *out = m;
    return KD_OK;
}

void kd_model_free(kd_model *m) {
    if (!m) return;
    if (m->vt && m->vt->free_impl) m->vt->free_impl(m->impl);
    else free(m->impl);
    kd_params_free(&m->params);
    free(m);
}

kd_status kd_model_forward(kd_model *m, kd_graph *g, kd_tensor *x, int flags, kd_model_out *out) {
    memset(out, 0, sizeof *out);
    if (!x) return kd_graph_status(g) != KD_OK ? kd_graph_status(g)
                                               : kd_error(KD_ERR_INVALID, "model forward: no input");
    if (x->ndim != 4 || x->shape[1] != m->cfg.in_channels) {
        char b[64];
        return kd_error(KD_ERR_SHAPE, "model '%s' expects input (N, %d, H, W), got %s", m->arch,
                        m->cfg.in_channels, kd_shape_str(x, b, sizeof b));
    }
    /* One scope around the whole forward: whatever an architecture leaves
     * behind besides its results is released here. */
    size_t sc = kd_graph_scope_begin(g);
    kd_status s = m->vt->forward(m, g, x, flags, out);
    kd_tensor *keep[1 + 2 * KD_MAX_FEATS];
    int n = 0;
    keep[n++] = out->logits;
    for (int k = 0; k < KD_MAX_FEATS; k++) {
        keep[n++] = out->feat[k];
        keep[n++] = out->preact[k];
    }
    kd_graph_scope_end(g, sc, n, keep);
    if (s == KD_OK) s = kd_graph_status(g);
    return s;
}

void kd_model_set_training(kd_model *m, int training) { m->training = training; }
int kd_model_training(const kd_model *m) { return m->training; }
const char *kd_model_arch(const kd_model *m) { return m->arch; }
const kd_model_cfg *kd_model_config(const kd_model *m) { return &m->cfg; }
kd_param_list *kd_model_params(kd_model *m) { return &m->params; }
int64_t kd_model_num_params(const kd_model *m) { return kd_params_count(&m->params); }
int64_t kd_model_feat_dim(const kd_model *m) { return m->feat_dim; }
