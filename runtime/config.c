/*
 * config.c - configurations as small parameter bags (see internal.h).
 */
#define _GNU_SOURCE
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static fm_param *find(const fm_config *c, const char *key) {
    for (int i = 0; i < c->nparams; i++)
        if (strcmp(c->params[i].key, key) == 0) return (fm_param *)&c->params[i];
    return NULL;
}

static fm_param *slot(fm_config *c, const char *key) {
    fm_param *p = find(c, key);
    if (p) return p;
    if (c->nparams >= FM_MAX_PARAMS || strlen(key) >= sizeof p->key) return NULL;
    p = &c->params[c->nparams++];
    memset(p, 0, sizeof *p);
    snprintf(p->key, sizeof p->key, "%s", key);
    return p;
}

long long fm_config_int(const fm_config *c, const char *key, long long dflt) {
    const fm_param *p = find(c, key);
    return p && !p->sval[0] ? p->ival : dflt;
}

const char *fm_config_str(const fm_config *c, const char *key) {
    const fm_param *p = find(c, key);
    return p && p->sval[0] ? p->sval : NULL;
}

int fm_config_set_int(fm_config *c, const char *key, long long v) {
    fm_param *p = slot(c, key);
    if (!p) return -1;
    p->sval[0] = 0;
    p->ival = v;
    return 0;
}

int fm_config_set_str(fm_config *c, const char *key, const char *v) {
    char copy[sizeof c->params[0].sval]; /* v may point into the slot being overwritten */
    if (!v[0] || strlen(v) >= sizeof copy) return -1;
    memcpy(copy, v, strlen(v) + 1);
    fm_param *p = slot(c, key);
    if (!p) return -1;
    memcpy(p->sval, copy, sizeof copy);
    return 0;
}

void fm_config_params_string(const fm_config *c, char *buf, size_t len) {
    size_t n = 0;
    buf[0] = 0;
    for (int i = 0; i < c->nparams && n < len; i++) {
        const fm_param *p = &c->params[i];
        int w = p->sval[0] ? snprintf(buf + n, len - n, "%s%s=%s", i ? "," : "", p->key, p->sval)
                           : snprintf(buf + n, len - n, "%s%s=%lld", i ? "," : "", p->key, p->ival);
        if (w < 0) break;
        n += (size_t)w;
    }
}

/* Parses "k=v,k=v": values that are whole integers become integers, others strings. */
int fm_config_parse_params(fm_config *c, const char *s) {
    char buf[1024];
    if (strlen(s) >= sizeof buf) return -1;
    snprintf(buf, sizeof buf, "%s", s);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq || eq == tok) return -1;
        *eq = 0;
        const char *v = eq + 1;
        char *end = NULL;
        long long iv = strtoll(v, &end, 10);
        int rc = (*v && end && *end == 0) ? fm_config_set_int(c, tok, iv) : fm_config_set_str(c, tok, v);
        if (rc) return -1;
    }
    return 0;
}
