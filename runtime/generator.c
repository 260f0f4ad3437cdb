/*
 * generator.c - the embedded Lua generator.
 *
 * The generator scripts (generator/NAME.lua) and the kernel templates (templates/...) are compiled
 * into the library as data (embedded.c, made by the build), so a deployed libflashmoe needs
 * neither the source tree nor a Lua installation. Every call into Lua goes through lua_pcall;
 * the C callbacks Lua calls hold no CUDA or SQLite resource, so an error raised in Lua unwinds
 * nothing that leaks.
 */
#define _GNU_SOURCE
#include "internal.h"
#include "embedded.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fm_generator {
    lua_State *L;
    char family_names[1024]; /* every embedded generator module but space */
};

const fm_embedded_file *fm_embedded_find(const char *path) {
    for (size_t i = 0; i < fm_embedded_count; i++)
        if (strcmp(fm_embedded_files[i].path, path) == 0) return &fm_embedded_files[i];
    return NULL;
}

/* fm_read_template(path) -> text | nil, err */
static int l_read_template(lua_State *L) {
    const char *p = luaL_checkstring(L, 1);
    char full[512];
    snprintf(full, sizeof full, "templates/%s", p);
    const fm_embedded_file *f = fm_embedded_find(full);
    if (!f) {
        lua_pushnil(L);
        lua_pushfstring(L, "no template '%s' in this build", p);
        return 2;
    }
    lua_pushlstring(L, (const char *)f->data, f->size);
    return 1;
}

/* package searcher: require("x") finds the embedded generator/x.lua */
static int l_search(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    char full[256];
    snprintf(full, sizeof full, "generator/%s.lua", name);
    const fm_embedded_file *f = fm_embedded_find(full);
    if (!f) {
        lua_pushfstring(L, "no embedded generator/%s.lua", name);
        return 1;
    }
    if (luaL_loadbufferx(L, (const char *)f->data, f->size, full, "t") != LUA_OK)
        return lua_error(L);
    lua_pushstring(L, full);
    return 2;
}

fm_status fm_generator_open(fm_generator **out, char *err, size_t errlen) {
    *out = NULL;
    fm_generator *g = calloc(1, sizeof *g);
    if (!g) return FM_ERR_OUT_OF_MEMORY;
    g->L = luaL_newstate();
    if (!g->L) {
        free(g);
        return FM_ERR_OUT_OF_MEMORY;
    }
    lua_State *L = g->L;
    luaL_openlibs(L);
    lua_register(L, "fm_read_template", l_read_template);
    /* package.searchers[2] = l_search (ahead of the file-system searchers) */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "searchers");
    lua_pushcfunction(L, l_search);
    lua_rawseti(L, -2, 2);
    lua_pop(L, 2);
    /* space = require("space") */
    lua_getglobal(L, "require");
    lua_pushstring(L, "space");
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        snprintf(err, errlen, "generator: %s", lua_tostring(L, -1));
        lua_close(L);
        free(g);
        return FM_ERR_GENERATOR;
    }
    lua_setglobal(L, "space");
    size_t n = 0;
    for (size_t i = 0; i < fm_embedded_count; i++) {
        const char *p = fm_embedded_files[i].path;
        size_t len = strlen(p);
        if (strncmp(p, "generator/", 10) != 0 || len < 14 || strcmp(p + len - 4, ".lua") != 0)
            continue;
        if (strcmp(p, "generator/space.lua") == 0) continue;
        int w = snprintf(g->family_names + n, sizeof g->family_names - n, "%s%.*s", n ? "," : "",
                         (int)(len - 14), p + 10);
        if (w > 0) n += (size_t)w;
    }
    *out = g;
    return FM_OK;
}

void fm_generator_close(fm_generator *g) {
    if (!g) return;
    lua_close(g->L);
    free(g);
}

/* Pushes space.<fn> */
static void push_space_fn(lua_State *L, const char *fn) {
    lua_getglobal(L, "space");
    lua_getfield(L, -1, fn);
    lua_remove(L, -2);
}

static void push_params(lua_State *L, const fm_config *c) {
    lua_createtable(L, 0, c->nparams);
    for (int i = 0; i < c->nparams; i++) {
        const fm_param *p = &c->params[i];
        if (p->sval[0])
            lua_pushstring(L, p->sval);
        else
            lua_pushinteger(L, p->ival);
        lua_setfield(L, -2, p->key);
    }
}

static void push_limits(lua_State *L, const fm_limits *lim) {
    if (!lim) {
        lua_pushnil(L);
        return;
    }
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, lim->arch);
    lua_setfield(L, -2, "arch");
    lua_pushinteger(L, lim->smem_per_block);
    lua_setfield(L, -2, "smem_per_block");
    lua_pushinteger(L, lim->regs_per_sm);
    lua_setfield(L, -2, "regs_per_sm");
}

static void push_family_names(lua_State *L, const fm_generator *g) {
    lua_newtable(L);
    int i = 1;
    char names[1024];
    snprintf(names, sizeof names, "%s", g->family_names);
    char *save = NULL;
    for (char *t = strtok_r(names, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        lua_pushstring(L, t);
        lua_rawseti(L, -2, i++);
    }
}

typedef struct emit_ud {
    fm_enum_cb cb;
    void *user;
    const char *family;
} emit_ud;

/* emit(name, flat, reason) from space.c_enumerate / c_problems */
static int l_emit(lua_State *L) {
    emit_ud *u = (emit_ud *)lua_touserdata(L, lua_upvalueindex(1));
    fm_config c;
    memset(&c, 0, sizeof c);
    /* a 4th argument names the family when the caller could not know it (c_default) */
    snprintf(c.family, sizeof c.family, "%s",
             lua_type(L, 4) == LUA_TSTRING ? lua_tostring(L, 4) : u->family);
    snprintf(c.name, sizeof c.name, "%s", luaL_checkstring(L, 1));
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer n = luaL_len(L, 2);
    for (lua_Integer i = 1; i <= n; i++) {
        lua_rawgeti(L, 2, i);
        lua_rawgeti(L, -1, 1);
        lua_rawgeti(L, -2, 2);
        const char *key = lua_tostring(L, -2);
        int rc;
        if (lua_isinteger(L, -1))
            rc = fm_config_set_int(&c, key, (long long)lua_tointeger(L, -1));
        else
            rc = fm_config_set_str(&c, key, lua_tostring(L, -1));
        if (rc) return luaL_error(L, "configuration %s: parameter %s does not fit", c.name, key);
        lua_pop(L, 3);
    }
    const char *reason = lua_isnoneornil(L, 3) ? NULL : lua_tostring(L, 3);
    int stop = u->cb(u->user, &c, reason);
    lua_pushboolean(L, stop);
    return 1;
}

static fm_status run_emitting(fm_generator *g, const char *fn, const char *family,
                              const fm_config *problem, const fm_limits *lim, fm_enum_cb cb,
                              void *user, char *err, size_t errlen) {
    lua_State *L = g->L;
    emit_ud u = {cb, user, family};
    push_space_fn(L, fn);
    lua_pushstring(L, family);
    int nargs = 2;
    if (problem) {
        push_params(L, problem);
        push_limits(L, lim);
        nargs = 4;
    }
    lua_pushlightuserdata(L, &u);
    lua_pushcclosure(L, l_emit, 1);
    if (lua_pcall(L, nargs, 0, 0) != LUA_OK) {
        snprintf(err, errlen, "generator: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        return FM_ERR_GENERATOR;
    }
    return FM_OK;
}

fm_status fm_generator_enumerate(fm_generator *g, const char *family, const fm_config *problem,
                                 const fm_limits *lim, fm_enum_cb cb, void *user, char *err,
                                 size_t errlen) {
    return run_emitting(g, "c_enumerate", family, problem, lim, cb, user, err, errlen);
}

fm_status fm_generator_problems(fm_generator *g, const char *family, fm_enum_cb cb, void *user,
                                char *err, size_t errlen) {
    return run_emitting(g, "c_problems", family, NULL, NULL, cb, user, err, errlen);
}

fm_status fm_generator_name(fm_generator *g, fm_config *c, char *err, size_t errlen) {
    lua_State *L = g->L;
    push_space_fn(L, "c_name");
    lua_pushstring(L, c->family);
    push_params(L, c);
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
        snprintf(err, errlen, "generator: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        return FM_ERR_GENERATOR;
    }
    snprintf(c->name, sizeof c->name, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return FM_OK;
}

static int field_int(lua_State *L, int idx, const char *k) {
    lua_getfield(L, idx, k);
    int v = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    return v;
}

static void field_str(lua_State *L, int idx, const char *k, char *dst, size_t len) {
    lua_getfield(L, idx, k);
    const char *s = lua_tostring(L, -1);
    snprintf(dst, len, "%s", s ? s : "");
    lua_pop(L, 1);
}

fm_status fm_generator_render(fm_generator *g, const fm_config *c, fm_rendered *out, char *err,
                              size_t errlen) {
    lua_State *L = g->L;
    memset(out, 0, sizeof *out);
    push_space_fn(L, "c_render");
    lua_pushstring(L, c->family);
    push_params(L, c);
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
        snprintf(err, errlen, "generator: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        return FM_ERR_GENERATOR;
    }
    int t = lua_gettop(L);
    size_t len = 0;
    lua_getfield(L, t, "source");
    const char *src = lua_tolstring(L, -1, &len);
    out->source = src ? malloc(len + 1) : NULL;
    if (out->source) memcpy(out->source, src, len + 1);
    lua_pop(L, 1);
    field_str(L, t, "entry", out->entry, sizeof out->entry);
    field_str(L, t, "arch_suffix", out->arch_suffix, sizeof out->arch_suffix);
    field_str(L, t, "template_hash", out->template_hash, sizeof out->template_hash);
    out->threads = field_int(L, t, "threads");
    out->smem_bytes = field_int(L, t, "smem_bytes");
    out->min_arch = field_int(L, t, "min_arch");
    lua_getfield(L, t, "launch");
    if (lua_istable(L, -1)) {
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            /* keys are strings, values integers (lua_isinteger: no string coercion) */
            if (lua_type(L, -2) == LUA_TSTRING && lua_isinteger(L, -1))
                fm_config_set_int(&out->launch, lua_tostring(L, -2), lua_tointeger(L, -1));
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 2);
    if (!out->source) return FM_ERR_OUT_OF_MEMORY;
    return FM_OK;
}

void fm_rendered_free(fm_rendered *r) {
    if (!r) return;
    free(r->source);
    r->source = NULL;
}

static int take_first(void *user, const fm_config *c, const char *reason) {
    (void)reason;
    *(fm_config *)user = *c;
    return 1;
}

fm_status fm_generator_default(fm_generator *g, const char *op, const fm_config *problem,
                               const fm_limits *lim, fm_config *out, char *err, size_t errlen) {
    lua_State *L = g->L;
    memset(out, 0, sizeof *out);
    emit_ud u = {take_first, out, ""};
    push_space_fn(L, "c_default");
    lua_pushstring(L, op);
    push_family_names(L, g);
    push_params(L, problem);
    push_limits(L, lim);
    lua_pushlightuserdata(L, &u);
    lua_pushcclosure(L, l_emit, 1);
    if (lua_pcall(L, 5, 0, 0) != LUA_OK) {
        snprintf(err, errlen, "generator: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        return FM_ERR_GENERATOR;
    }
    if (!out->name[0]) {
        snprintf(err, errlen, "generator: no default configuration for %s", op);
        return FM_ERR_GENERATOR;
    }
    return FM_OK;
}

fm_status fm_generator_families(fm_generator *g, const char *op, char *buf, size_t len) {
    lua_State *L = g->L;
    push_space_fn(L, "c_families");
    if (op)
        lua_pushstring(L, op);
    else
        lua_pushnil(L);
    push_family_names(L, g);
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
        snprintf(buf, len, "generator: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
        return FM_ERR_GENERATOR;
    }
    snprintf(buf, len, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    return FM_OK;
}
