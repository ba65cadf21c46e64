/*
 * A qemu-user TCG plugin that counts executed guest instructions, in total and per
 * translation block, for perch's ARM cost figures (cross/insncount.sh).
 *
 * Written against QEMU's plugin API version 1 (qemu 7.2, Debian's qemu-user); the few
 * declarations it needs are in insncount-api.h, so no QEMU headers are required.
 *
 * Arguments (-plugin libinsncount.so,out=FILE): at exit it writes to FILE one line
 * "entry <guest entry address>", one line "start <start of the main binary's text>", then one line "<tb guest address> <instructions>" per
 * translation-block start address (instructions executed in blocks starting there), and
 * prints the total on qemu's plugin log (-d plugin). Counters are plain inline adds: exact
 * for a single-threaded guest (run perch with --threads 1).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "insncount-api.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = 1;

struct block {
    uint64_t vaddr;
    uint64_t n_insns;
    uint64_t execs;
    struct block *next;
};

static struct block *blocks;
static char out_path[4096];

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    struct block *b = calloc(1, sizeof(*b));
    if (!b) {
        return;
    }
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->n_insns = qemu_plugin_tb_n_insns(tb);
    b->next = blocks;
    blocks = b;
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->execs, 1);
}

static void on_atexit(qemu_plugin_id_t id, void *userdata)
{
    (void)id;
    (void)userdata;
    uint64_t total = 0;
    FILE *f = out_path[0] ? fopen(out_path, "w") : NULL;
    if (f) {
        fprintf(f, "entry %llx\n", (unsigned long long)qemu_plugin_entry_code());
        fprintf(f, "start %llx\n", (unsigned long long)qemu_plugin_start_code());
    }
    for (struct block *b = blocks; b; b = b->next) {
        uint64_t n = b->n_insns * b->execs;
        total += n;
        if (f && n) {
            fprintf(f, "%llx %llu\n", (unsigned long long)b->vaddr, (unsigned long long)n);
        }
    }
    if (f) {
        fclose(f);
    }
    char line[64];
    snprintf(line, sizeof(line), "insns %llu\n", (unsigned long long)total);
    qemu_plugin_outs(line);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            snprintf(out_path, sizeof(out_path), "%s", argv[i] + 4);
        }
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
    qemu_plugin_register_atexit_cb(id, on_atexit, NULL);
    return 0;
}
