"""PyTorch references of kd's distillation methods, one module per method,
written from ../shared/METHODS.md (and the official code it cites), for
tools/gen_distill_fixtures.py. Each module defines

    NAME     the kd method name ("fitnet")
    WEIGHTS  dict(gamma=..., alpha=..., beta=..., T=...): the published weights
    cases(rng) -> list of dicts, each with
             name, s_feats (list of float32 tensors), t_feats, s_logits,
             t_logits, labels (int64), args (dict "<setting>" -> text, the
             method settings this case uses beyond the defaults), epoch (0-based,
             default 0), training (1: modules in train mode, default 1)
    build(case) -> torch.nn.Module or None: the method's own modules with the
             parameter names kd uses (state_dict names), randomly initialised;
             the generator copies them into kd, so the init need not match
    term(mod, case, s_feats, s_logits, t_feats, t_logits, labels) -> the
             unweighted method term (0-d), or None for methods without one
    terms(mod, case, s_feats, s_logits, t_feats, t_logits, labels), optional:
             the named weighted terms of a method whose loss is its own (kd's
             `loss` hook: SSKD's four terms on 4 interleaved views, where the
             student's and teacher's outputs have 4N rows and the labels N);
             it replaces the default composition gamma CE + alpha KL + beta term

Everything runs in float64 from the float32 inputs.
"""
