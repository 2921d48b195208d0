/*
 * basic_auth: a proxy-wasm (ABI 0.2.1) HTTP filter in plain C, configured like Istio's
 * istio-ecosystem basic_auth extension:
 *
 *   {"basic_auth_rules": [
 *      {"prefix": "/productpage",            (or "exact" / "suffix")
 *       "request_methods": ["GET", "POST"],   (empty or absent: every method)
 *       "credentials": ["ok:test", "YWRtaW4zOmFkbWluMw=="]}],   (user:pass or base64)
 *    "realm": "istio"}                        (optional, default "istio")
 *
 * A request whose path and method match a rule must carry `Authorization: Basic <b64>` with
 * one of the rule's credentials; otherwise the filter answers 401 with
 * `WWW-Authenticate: Basic realm="<realm>"`. Requests matching no rule pass.
 *
 * Build (Debian clang + lld + wasi-libc):
 *   clang --target=wasm32-wasi -O2 -mexec-model=reactor -Wl,--strip-all -o basic_auth.wasm basic_auth.c
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define IMPORT(n) __attribute__((import_module("env"), import_name(n)))
#define EXPORT(n) __attribute__((export_name(n)))

enum { WASM_OK = 0 };
enum { LOG_INFO = 2, LOG_WARN = 3 };
enum { BUFFER_PLUGIN_CONFIGURATION = 7 };
enum { MAP_REQUEST_HEADERS = 0 };
enum { ACTION_CONTINUE = 0, ACTION_PAUSE = 1 };

IMPORT("proxy_log") int32_t proxy_log(int32_t level, const char *msg, size_t len);
IMPORT("proxy_get_buffer_bytes")
int32_t proxy_get_buffer_bytes(int32_t type, uint32_t start, uint32_t max, char **data, size_t *size);
IMPORT("proxy_get_header_map_value")
int32_t proxy_get_header_map_value(int32_t map, const char *k, size_t kl, char **v, size_t *vl);
IMPORT("proxy_send_local_response")
int32_t proxy_send_local_response(uint32_t status, const char *details, size_t details_len, const char *body,
                                  size_t body_len, const char *headers, size_t headers_len, int32_t grpc_status);

/* ------------------------------------------------------------------ configuration model */

#define MAX_RULES 32
#define MAX_ITEMS 32

typedef enum { MATCH_PREFIX, MATCH_EXACT, MATCH_SUFFIX } match_kind;

typedef struct {
    match_kind kind;
    char *pattern;
    char *methods[MAX_ITEMS];
    int n_methods;
    char *credentials[MAX_ITEMS]; /* base64 of user:pass */
    int n_credentials;
} rule;

static rule rules[MAX_RULES];
static int n_rules;
static char realm[128] = "istio";

static void log_msg(int level, const char *msg) { proxy_log(level, msg, strlen(msg)); }

/* ------------------------------------------------------------------ base64 */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static char *b64_encode(const char *in, size_t n) {
    char *out = malloc(4 * ((n + 2) / 3) + 1), *p = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint8_t)in[i] << 16;
        if (i + 1 < n) v |= (uint8_t)in[i + 1] << 8;
        if (i + 2 < n) v |= (uint8_t)in[i + 2];
        *p++ = B64[(v >> 18) & 63];
        *p++ = B64[(v >> 12) & 63];
        *p++ = i + 1 < n ? B64[(v >> 6) & 63] : '=';
        *p++ = i + 2 < n ? B64[v & 63] : '=';
    }
    *p = 0;
    return out;
}

/* ------------------------------------------------------------------ a small JSON reader */

typedef struct {
    const char *s, *end;
    int ok;
} json;

static void ws(json *j) {
    while (j->s < j->end && (*j->s == ' ' || *j->s == '\n' || *j->s == '\r' || *j->s == '\t')) j->s++;
}

static int eat(json *j, char c) {
    ws(j);
    if (j->s < j->end && *j->s == c) { j->s++; return 1; }
    return 0;
}

/* Reads a JSON string into a new NUL-terminated buffer (simple escapes only). */
static char *str(json *j) {
    ws(j);
    if (j->s >= j->end || *j->s != '"') { j->ok = 0; return NULL; }
    j->s++;
    char *out = malloc(j->end - j->s + 1), *o = out;
    if (!out) { j->ok = 0; return NULL; }
    while (j->s < j->end && *j->s != '"') {
        char c = *j->s++;
        if (c == '\\' && j->s < j->end) {
            char e = *j->s++;
            c = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
        }
        *o++ = c;
    }
    *o = 0;
    if (j->s >= j->end) { j->ok = 0; free(out); return NULL; }
    j->s++;
    return out;
}

static void skip(json *j);

static void skip_container(json *j, char open, char close) {
    eat(j, open);
    if (eat(j, close)) return;
    do {
        if (open == '{') { free(str(j)); if (!eat(j, ':')) { j->ok = 0; return; } }
        skip(j);
    } while (j->ok && eat(j, ','));
    if (!eat(j, close)) j->ok = 0;
}

static void skip(json *j) {
    ws(j);
    if (j->s >= j->end) { j->ok = 0; return; }
    switch (*j->s) {
    case '"': free(str(j)); return;
    case '{': skip_container(j, '{', '}'); return;
    case '[': skip_container(j, '[', ']'); return;
    default:
        while (j->s < j->end && !strchr(",}] \n\r\t", *j->s)) j->s++;
    }
}

/* ["a", "b"] → items (up to MAX_ITEMS). */
static int str_array(json *j, char **items) {
    int n = 0;
    if (!eat(j, '[')) { j->ok = 0; return 0; }
    if (eat(j, ']')) return 0;
    do {
        char *v = str(j);
        if (v && n < MAX_ITEMS) items[n++] = v; else free(v);
    } while (j->ok && eat(j, ','));
    if (!eat(j, ']')) j->ok = 0;
    return n;
}

static void parse_rule(json *j, rule *r) {
    memset(r, 0, sizeof *r);
    if (!eat(j, '{')) { j->ok = 0; return; }
    if (eat(j, '}')) return;
    do {
        char *key = str(j);
        if (!key || !eat(j, ':')) { free(key); j->ok = 0; return; }
        if (!strcmp(key, "prefix") || !strcmp(key, "exact") || !strcmp(key, "suffix")) {
            r->kind = key[0] == 'p' ? MATCH_PREFIX : key[0] == 'e' ? MATCH_EXACT : MATCH_SUFFIX;
            r->pattern = str(j);
        } else if (!strcmp(key, "request_methods")) {
            r->n_methods = str_array(j, r->methods);
        } else if (!strcmp(key, "credentials")) {
            char *raw[MAX_ITEMS];
            int n = str_array(j, raw);
            for (int i = 0; i < n; i++) {
                /* "user:pass" is encoded here; anything without ':' is taken as base64 already. */
                r->credentials[r->n_credentials++] = strchr(raw[i], ':') ? b64_encode(raw[i], strlen(raw[i])) : raw[i];
                if (strchr(raw[i], ':')) free(raw[i]);
            }
        } else {
            skip(j);
        }
        free(key);
    } while (j->ok && eat(j, ','));
    if (!eat(j, '}')) j->ok = 0;
}

static int parse_config(const char *data, size_t len) {
    json j = {data, data + len, 1};
    n_rules = 0;
    if (!eat(&j, '{')) return 0;
    if (eat(&j, '}')) return 1;
    do {
        char *key = str(&j);
        if (!key || !eat(&j, ':')) { free(key); return 0; }
        if (!strcmp(key, "basic_auth_rules")) {
            if (!eat(&j, '[')) { free(key); return 0; }
            if (!eat(&j, ']')) {
                do {
                    if (n_rules < MAX_RULES) parse_rule(&j, &rules[n_rules++]); else skip(&j);
                } while (j.ok && eat(&j, ','));
                if (!eat(&j, ']')) j.ok = 0;
            }
        } else if (!strcmp(key, "realm")) {
            char *v = str(&j);
            if (v) { strncpy(realm, v, sizeof realm - 1); free(v); }
        } else {
            skip(&j);
        }
        free(key);
    } while (j.ok && eat(&j, ','));
    return j.ok && eat(&j, '}');
}

/* ------------------------------------------------------------------ request handling */

static int path_matches(const rule *r, const char *path, size_t n) {
    /* Match against the path without its query string. */
    size_t plen = 0;
    while (plen < n && path[plen] != '?') plen++;
    size_t m = r->pattern ? strlen(r->pattern) : 0;
    switch (r->kind) {
    case MATCH_EXACT: return plen == m && !memcmp(path, r->pattern, m);
    case MATCH_SUFFIX: return plen >= m && !memcmp(path + plen - m, r->pattern, m);
    default: return plen >= m && !memcmp(path, r->pattern, m);
    }
}

static int method_matches(const rule *r, const char *method, size_t n) {
    if (r->n_methods == 0) return 1;
    for (int i = 0; i < r->n_methods; i++)
        if (strlen(r->methods[i]) == n && !memcmp(r->methods[i], method, n)) return 1;
    return 0;
}

static int credential_ok(const rule *r, const char *auth, size_t n) {
    static const char scheme[] = "Basic ";
    if (n < sizeof scheme - 1 || strncasecmp(auth, scheme, sizeof scheme - 1)) return 0;
    auth += sizeof scheme - 1;
    n -= sizeof scheme - 1;
    while (n && *auth == ' ') { auth++; n--; }
    while (n && auth[n - 1] == ' ') n--;
    for (int i = 0; i < r->n_credentials; i++)
        if (strlen(r->credentials[i]) == n && !memcmp(r->credentials[i], auth, n)) return 1;
    return 0;
}

/* Serialises one header pair in the proxy-wasm map format. */
static size_t one_header_map(char *buf, size_t cap, const char *k, const char *v) {
    uint32_t kl = strlen(k), vl = strlen(v);
    size_t need = 4 + 8 + kl + 1 + vl + 1;
    if (need > cap) return 0;
    uint32_t count = 1;
    memcpy(buf, &count, 4);
    memcpy(buf + 4, &kl, 4);
    memcpy(buf + 8, &vl, 4);
    memcpy(buf + 12, k, kl + 1);
    memcpy(buf + 12 + kl + 1, v, vl + 1);
    return need;
}

static uint32_t deny(void) {
    char value[192], map[256];
    static const char key[] = "WWW-Authenticate", body[] = "Unauthorized\n", details[] = "basic_auth_unauthorized";
    strcpy(value, "Basic realm=\"");
    strncat(value, realm, sizeof value - 20);
    strcat(value, "\"");
    size_t n = one_header_map(map, sizeof map, key, value);
    proxy_send_local_response(401, details, sizeof details - 1, body, sizeof body - 1, map, n, -1);
    return ACTION_PAUSE;
}

static int header(const char *name, char **v, size_t *n) {
    *v = NULL;
    *n = 0;
    return proxy_get_header_map_value(MAP_REQUEST_HEADERS, name, strlen(name), v, n) == WASM_OK && *v;
}

/* ------------------------------------------------------------------ ABI exports */

EXPORT("proxy_abi_version_0_2_1") void proxy_abi_version_0_2_1(void) {}
EXPORT("proxy_on_memory_allocate") void *proxy_on_memory_allocate(size_t n) { return malloc(n); }
EXPORT("proxy_on_context_create") void proxy_on_context_create(uint32_t ctx, uint32_t root) {}
EXPORT("proxy_on_vm_start") uint32_t proxy_on_vm_start(uint32_t ctx, uint32_t size) { return 1; }

EXPORT("proxy_on_configure") uint32_t proxy_on_configure(uint32_t ctx, uint32_t size) {
    char *data = NULL;
    size_t n = 0;
    if (size == 0) { n_rules = 0; return 1; }
    if (proxy_get_buffer_bytes(BUFFER_PLUGIN_CONFIGURATION, 0, size, &data, &n) != WASM_OK || !data) {
        log_msg(LOG_WARN, "basic_auth: cannot read the plugin configuration");
        return 0;
    }
    int ok = parse_config(data, n);
    free(data);
    if (!ok) {
        log_msg(LOG_WARN, "basic_auth: invalid JSON configuration");
        return 0;
    }
    log_msg(LOG_INFO, "basic_auth: configured");
    return 1;
}

EXPORT("proxy_on_request_headers")
uint32_t proxy_on_request_headers(uint32_t ctx, uint32_t headers, uint32_t end_of_stream) {
    char *path, *method, *auth;
    size_t pl, ml, al;
    if (!header(":path", &path, &pl)) return ACTION_CONTINUE;
    header(":method", &method, &ml);
    uint32_t action = ACTION_CONTINUE;
    for (int i = 0; i < n_rules; i++) {
        const rule *r = &rules[i];
        if (!path_matches(r, path, pl) || !method_matches(r, method ? method : "", ml)) continue;
        int have = header("authorization", &auth, &al);
        int ok = have && credential_ok(r, auth, al);
        free(auth);
        if (!ok) action = deny();
        break;
    }
    free(path);
    free(method);
    return action;
}

EXPORT("proxy_on_done") uint32_t proxy_on_done(uint32_t ctx) { return 1; }
EXPORT("proxy_on_log") void proxy_on_log(uint32_t ctx) {}
EXPORT("proxy_on_delete") void proxy_on_delete(uint32_t ctx) {}
