/* Status codes and the per-thread last-error message. */
#include "kd/core.h"

#include <stdio.h>
#include <string.h>

static _Thread_local char kd__errbuf[1024];
static _Thread_local kd_status kd__errstat = KD_OK;

const char *kd_status_str(kd_status s) {
    switch (s) {
#define KD__STATUS_STR(name, val, text) \
    case KD_##name: return text;
        KD_STATUS_MAP(KD__STATUS_STR)
#undef KD__STATUS_STR
    }
    return "unknown status";
}

kd_status kd_error(kd_status s, const char *fmt, ...) {
    /* Format into a local buffer first: callers may pass kd_last_error() as
     * an argument to wrap the previous message. */
    char tmp[sizeof kd__errbuf];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    memcpy(kd__errbuf, tmp, sizeof tmp);
    kd__errstat = s;
    return s;
}

const char *kd_last_error(void) {
    if (kd__errbuf[0]) return kd__errbuf;
    return kd_status_str(kd__errstat);
}

void kd_clear_error(void) {
    kd__errbuf[0] = '\0';
    kd__errstat = KD_OK;
}

const char *kd_version(void) {
#ifdef KD_VERSION_STRING
    return KD_VERSION_STRING;
#else
    return "0.0.0";
#endif
}
