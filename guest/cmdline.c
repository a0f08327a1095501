/* Command-line options: space-separated; unknown options are ignored. */
#include "guest.h"

#define DEFAULT_TESTS "serial,bootinfo,e820,cmdline"

struct options opt;

/* The next space-separated token at *cursor (NULL at the end of the line); *cursor moves past it. */
const char *cmdline_token(const char **cursor, size_t *len)
{
    const char *p = *cursor;
    while (*p == ' ' || *p == '\t' || *p == '\n')
        p++;
    const char *tok = p;
    while (*p && *p != ' ' && *p != '\t' && *p != '\n')
        p++;
    *cursor = p;
    *len = p - tok;
    return *len ? tok : NULL;
}

/* Whether token `tok` is `name=value`; if so, the value and its length. */
bool option_is(const char *tok, size_t len, const char *name, const char **value, size_t *value_len)
{
    size_t n = strlen(name);
    if (len <= n || memcmp(tok, name, n) != 0 || tok[n] != '=')
        return false;
    *value = tok + n + 1;
    *value_len = len - n - 1;
    return true;
}

static void set_number(const char *name, const char *v, size_t len, uint64_t *out)
{
    if (!parse_u64(v, len, out))
        kprintf("OPTION %s: not a number, ignored\n", name);
}

void options_parse(const char *cmdline)
{
    bool tests_set = false;
    opt.loops = 10000000;
    opt.touch_mib = 16;

    const char *p = cmdline, *tok;
    size_t len;
    while ((tok = cmdline_token(&p, &len)) != NULL) {
        const char *v;
        size_t vlen;
        uint64_t n;
        if (option_is(tok, len, "kvmlet.test", &v, &vlen)) {
            if (vlen >= sizeof(opt.tests))
                vlen = sizeof(opt.tests) - 1;
            memcpy(opt.tests, v, vlen);
            opt.tests[vlen] = '\0';
            tests_set = true;
        } else if (option_is(tok, len, "kvmlet.exit", &v, &vlen)) {
            if (parse_u64(v, vlen, &n)) {
                opt.exit_set = true;
                opt.exit_status = n & 0xff;
            } else {
                kprintf("OPTION kvmlet.exit: not a number, ignored\n");
            }
        } else if (option_is(tok, len, "kvmlet.loops", &v, &vlen)) {
            set_number("kvmlet.loops", v, vlen, &opt.loops);
        } else if (option_is(tok, len, "kvmlet.touch", &v, &vlen)) {
            set_number("kvmlet.touch", v, vlen, &opt.touch_mib);
        } else if (option_is(tok, len, "kvmlet.timeout", &v, &vlen)) {
            if (parse_u64(v, vlen, &opt.timeout_s))
                opt.timeout_set = true;
            else
                kprintf("OPTION kvmlet.timeout: not a number, ignored\n");
        }
    }
    if (!tests_set)
        memcpy(opt.tests, DEFAULT_TESTS, sizeof(DEFAULT_TESTS));
}
