/* Table-driven flags for the kd commands whose options are not run settings
 * (kd eval, kd select, kd export; kd train and kd distill use the settings
 * table of src/train/config.c). Each command lists its flags once, as rows of
 * a kd__flag table: name, kind of value, destination in the command's options
 * struct, metavariable, help line and the modes it applies to. One parser and
 * one help printer read that table, so a flag's type, range, default and help
 * are decided in one place.
 *
 *   typedef struct { char out[512]; int ema; } opts;
 *   static const kd__flag tab[] = {
 *       KD__FLAG_ROW_STR("--out", opts, out, "FILE", .required = 1, .help = "the file to write"),
 *       KD__FLAG_ROW_SWITCH("--ema", opts, ema, .help = "export the EMA copy"),
 *   };
 *   opts o = {0};
 *   unsigned char given[2];
 *   int r = kd__flags_parse("export", tab, 2, argc, argv, &o, given);
 */
#ifndef KD_CLI_FLAGS_H
#define KD_CLI_FLAGS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum {
    KD__FLAG_STRING, /* copied into a char[size]; too long is an error */
    KD__FLAG_INT,    /* an int in [lo, hi] */
    KD__FLAG_I64,    /* an int64_t in [lo, hi] */
    KD__FLAG_POS,    /* a finite double > 0 */
    KD__FLAG_U64,    /* an unsigned 64-bit integer */
    KD__FLAG_SWITCH, /* an int set to 1; takes no value */
    KD__FLAG_CUSTOM, /* parsed and shown by the row's parse and show */
} kd__flag_kind;

typedef struct kd__flag kd__flag;
struct kd__flag {
    const char *name;    /* "--ckpt" */
    kd__flag_kind kind;
    size_t off, size;    /* the destination in the options struct */
    long long lo, hi;    /* KD__FLAG_INT, KD__FLAG_I64: the accepted range */
    const char *metavar; /* "FILE"; NULL for a switch */
    const char *help;    /* one sentence, wrapped when printed */
    unsigned modes;      /* the modes (bits) it applies to; 0: every mode */
    int required;        /* must be given in each mode it applies to */
    const char *empty;   /* the default shown for an empty string (NULL: none shown) */
    /* Optional: checks a string after it is stored; returns 0 with a message in err. */
    int (*check)(const char *value, char *err, size_t n);
    /* KD__FLAG_CUSTOM: stores the value into opts, or returns 0 with a message in err. */
    int (*parse)(const kd__flag *f, const char *value, void *opts, char *err, size_t n);
    /* KD__FLAG_CUSTOM: the value in opts as text, for the default shown in --help. */
    void (*show)(const void *opts, char *buf, size_t n);
};

/* The offset of field fld of T, which must have type type (a compile error otherwise). */
#define KD__FLAG_OFF(T, fld, type) (offsetof(T, fld) + 0 * sizeof(_Generic(((T *)0)->fld, type: 1)))
#define KD__FLAG_SIZE(T, fld) sizeof(((T *)0)->fld)

#define KD__FLAG_ROW_STR(nm, T, fld, meta, ...)                                                          \
    {.name = (nm), .kind = KD__FLAG_STRING, .off = KD__FLAG_OFF(T, fld, char *), .size = KD__FLAG_SIZE(T, fld), \
     .metavar = (meta), __VA_ARGS__}
#define KD__FLAG_ROW_INT(nm, T, fld, l, h, meta, ...)                                                     \
    {.name = (nm), .kind = KD__FLAG_INT, .off = KD__FLAG_OFF(T, fld, int), .size = sizeof(int), .lo = (l), \
     .hi = (h), .metavar = (meta), __VA_ARGS__}
#define KD__FLAG_ROW_I64(nm, T, fld, l, h, meta, ...)                                                     \
    {.name = (nm), .kind = KD__FLAG_I64, .off = KD__FLAG_OFF(T, fld, int64_t), .size = sizeof(int64_t),    \
     .lo = (l), .hi = (h), .metavar = (meta), __VA_ARGS__}
#define KD__FLAG_ROW_POS(nm, T, fld, meta, ...)                                                           \
    {.name = (nm), .kind = KD__FLAG_POS, .off = KD__FLAG_OFF(T, fld, double), .size = sizeof(double),      \
     .metavar = (meta), __VA_ARGS__}
#define KD__FLAG_ROW_U64(nm, T, fld, meta, ...)                                                           \
    {.name = (nm), .kind = KD__FLAG_U64, .off = KD__FLAG_OFF(T, fld, uint64_t), .size = sizeof(uint64_t),  \
     .metavar = (meta), __VA_ARGS__}
#define KD__FLAG_ROW_SWITCH(nm, T, fld, ...)                                                              \
    {.name = (nm), .kind = KD__FLAG_SWITCH, .off = KD__FLAG_OFF(T, fld, int), .size = sizeof(int), __VA_ARGS__}
#define KD__FLAG_ROW_CUSTOM(nm, meta, parse_fn, show_fn, ...)                                             \
    {.name = (nm), .kind = KD__FLAG_CUSTOM, .metavar = (meta), .parse = (parse_fn), .show = (show_fn), __VA_ARGS__}

/* kd__flags_parse's results besides an exit code. */
#define KD__FLAGS_GO_ON (-1)
#define KD__FLAGS_HELP (-2)

/* Parses the argc arguments ("--flag value", "--flag=value", switches) of
 * `kd cmd` against the n rows of tab into opts; given[i] (n bytes) is set
 * to 1 when row i was given (the last value of a repeated flag wins). Returns
 * KD__FLAGS_GO_ON, KD__FLAGS_HELP when --help or -h came before any error, or
 * exit status 2 after printing one line "kd cmd: ..." on stderr (an unknown
 * flag, a missing or bad value, a value out of range or too long). */
int kd__flags_parse(const char *cmd, const kd__flag *tab, int n, int argc, char **argv, void *opts,
                    unsigned char *given);

/* After kd__flags_parse, for the mode (one bit; 0 for a command without
 * modes): refuses a given flag that does not apply to it ("--k applies to
 * --knn only") and a missing required flag. mode_names[b] names mode bit b.
 * Returns KD__FLAGS_GO_ON or 2 after printing one line. */
int kd__flags_check(const char *cmd, const kd__flag *tab, int n, const unsigned char *given, unsigned mode,
                    const char *const *mode_names);

/* Prints a usage line "PREFIX --req META [--opt META] ..." for the rows that
 * apply to mode (0: the rows of every mode), wrapped under PREFIX; with brief,
 * the optional rows of every mode are shortened to "[...]". */
void kd__flags_usage(FILE *fp, const char *prefix, const kd__flag *tab, int n, unsigned mode, int brief);

/* Prints one line per row whose modes equal modes (or every row when all):
 * "  --name META   help [default]", the default read from defaults (an options
 * struct holding them), the help wrapped and aligned for the whole table. */
void kd__flags_help(FILE *fp, const kd__flag *tab, int n, const void *defaults, unsigned modes, int all);

/* The whole flag handling of a command without modes: parse into opts;
 * --help prints the usage line ("usage: kd cmd ..."), about (a paragraph)
 * and the flag lines with the defaults of `defaults`, and returns 0; a
 * missing required flag or a bad flag prints one line and returns 2.
 * Returns KD__FLAGS_GO_ON when the command should run. */
int kd__flags_run(const char *cmd, const kd__flag *tab, int n, int argc, char **argv, void *opts,
                  const void *defaults, const char *about);

#endif
