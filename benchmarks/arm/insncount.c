/*
 * insncount: a QEMU TCG plugin counting executed AArch64 guest instructions between two markers.
 *
 * The guest opens a region with close(MARK_BEGIN) and ends it with close(MARK_END) (fds that cannot exist;
 * the calls just fail with EBADF).  At each region end one JSON line is appended to the file given as
 * `out=PATH`:  {"total": N, "load_store": N, "simd_fp": N, "other": N}
 *
 * Instructions are classified once, at translation, from the A64 top-level encoding (op0 = bits 28:25):
 *   x1x0  loads and stores (including SIMD/FP loads and stores)         -> load_store
 *   x111  scalar FP and Advanced SIMD data processing; 0010 SVE         -> simd_fp
 *   everything else (integer data processing, branches, system)        -> other
 * Counting uses inline adds per translation block (counted when the block starts).  With plugin API 1 (qemu
 * 7.x) the adds go to one global counter and are not atomic, so figures are exact only while one guest thread
 * runs (MNN numThread 1, onnxruntime 1 intra-op thread, OpenBLAS/OMP threads 1); with API >= 2 (qemu >= 8.2,
 * scoreboards) each vCPU has its own counters and a region reports their sum.  The same source builds for both.
 *
 * Build: gcc -O2 -shared -fPIC -I DIR_WITH_qemu-plugin.h $(pkg-config --cflags glib-2.0) -o libinsncount.so insncount.c
 * Use:   qemu-aarch64 -plugin ./libinsncount.so,out=counts.jsonl ...
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define NR_CLOSE_AARCH64 57
#define MARK_BEGIN 0x7E570001u
#define MARK_END 0x7E570002u

enum { LOAD_STORE, SIMD_FP, OTHER, N_CLASSES };

static uint64_t at_begin[N_CLASSES];
#if QEMU_PLUGIN_VERSION >= 2
typedef struct {
    uint64_t c[N_CLASSES];
} vcpu_counts;
static struct qemu_plugin_scoreboard *board;

static qemu_plugin_u64 entry(int c)
{
    return qemu_plugin_scoreboard_u64_in_struct(board, vcpu_counts, c[c]);
}

static uint64_t read_count(int c)
{
    return qemu_plugin_u64_sum(entry(c));
}

static void add_inline(struct qemu_plugin_tb *tb, int c, uint64_t n)
{
    qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(tb, QEMU_PLUGIN_INLINE_ADD_U64, entry(c), n);
}
#else
static uint64_t counts[N_CLASSES];

static uint64_t read_count(int c)
{
    return counts[c];
}

static void add_inline(struct qemu_plugin_tb *tb, int c, uint64_t n)
{
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &counts[c], n);
}
#endif

static uint32_t insn_word(const struct qemu_plugin_insn *insn)
{
    uint32_t word = 0;
#if QEMU_PLUGIN_VERSION >= 3
    qemu_plugin_insn_data(insn, &word, sizeof(word));
#else
    memcpy(&word, qemu_plugin_insn_data(insn), sizeof(word));
#endif
    return word;
}
static int in_region;
static FILE *out;

static int classify(uint32_t insn)
{
    uint32_t op0 = (insn >> 25) & 0xF;
    if ((op0 & 0x5) == 0x4) {
        return LOAD_STORE;
    }
    if ((op0 & 0x7) == 0x7 || op0 == 0x2) {
        return SIMD_FP;
    }
    return OTHER;
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    uint64_t n[N_CLASSES] = {0};
    size_t n_insns = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n_insns; i++) {
        n[classify(insn_word(qemu_plugin_tb_get_insn(tb, i)))]++;
    }
    for (int c = 0; c < N_CLASSES; c++) {
        if (n[c]) {
            add_inline(tb, c, n[c]);
        }
    }
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7,
                       uint64_t a8)
{
    /* close() takes an int: only the low 32 bits of x0 are defined. */
    uint32_t fd = (uint32_t)a1;
    if (num != NR_CLOSE_AARCH64 || (fd != MARK_BEGIN && fd != MARK_END)) {
        return;
    }
    if (fd == MARK_BEGIN) {
        for (int c = 0; c < N_CLASSES; c++) {
            at_begin[c] = read_count(c);
        }
        in_region = 1;
        return;
    }
    if (!in_region) {
        return;
    }
    in_region = 0;
    uint64_t d[N_CLASSES];
    for (int c = 0; c < N_CLASSES; c++) {
        d[c] = read_count(c) - at_begin[c];
    }
    fprintf(out,
            "{\"total\": %" PRIu64 ", \"load_store\": %" PRIu64 ", \"simd_fp\": %" PRIu64
            ", \"other\": %" PRIu64 "}\n",
            d[LOAD_STORE] + d[SIMD_FP] + d[OTHER], d[LOAD_STORE], d[SIMD_FP], d[OTHER]);
    fflush(out);
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    if (out && out != stderr) {
        fclose(out);
    }
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                                           char **argv)
{
    if (strcmp(info->target_name, "aarch64") != 0) {
        fprintf(stderr, "insncount: aarch64 guests only (got %s)\n", info->target_name);
        return -1;
    }
    out = stderr;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            out = fopen(argv[i] + 4, "w");
            if (!out) {
                perror("insncount: cannot open out= file");
                return -1;
            }
        }
    }
#if QEMU_PLUGIN_VERSION >= 2
    board = qemu_plugin_scoreboard_new(sizeof(vcpu_counts));
#endif
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
