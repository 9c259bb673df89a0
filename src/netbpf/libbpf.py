# SPDX-License-Identifier: MIT
"""The cffi layer over libbpf.so: declarations, library discovery, nothing else.

ABI mode (dlopen), so nothing is compiled at install time. Only functions present in libbpf 1.1
(Debian bookworm) are declared as required; newer ones are looked up with `has()`.

Which library is loaded, first match wins:
  1. $NETBPF_LIBBPF (a path to a libbpf.so.1)
  2. libbpf.so.1 next to the BPF objects (the vendored external/libbpf, copied there by `make`)
  3. the system libbpf.so.1
"""

import os
from pathlib import Path

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    struct bpf_object; struct bpf_program; struct bpf_map; struct bpf_link; struct btf;

    typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *va_list_ap);
    libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
    int libbpf_strerror(int err, char *buf, size_t size);
    int libbpf_num_possible_cpus(void);
    unsigned int libbpf_major_version(void);
    unsigned int libbpf_minor_version(void);

    struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
    struct bpf_object *bpf_object__open_mem(const void *buf, size_t size, const void *opts);
    int bpf_object__load(struct bpf_object *obj);
    void bpf_object__close(struct bpf_object *obj);
    const char *bpf_object__name(const struct bpf_object *obj);
    struct btf *bpf_object__btf(const struct bpf_object *obj);
    struct bpf_program *bpf_object__next_program(const struct bpf_object *obj, struct bpf_program *prog);
    struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);

    const char *bpf_program__name(const struct bpf_program *prog);
    const char *bpf_program__section_name(const struct bpf_program *prog);
    int bpf_program__fd(const struct bpf_program *prog);
    int bpf_program__type(const struct bpf_program *prog);
    int bpf_program__expected_attach_type(const struct bpf_program *prog);
    int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
    int bpf_program__set_log_buf(struct bpf_program *prog, char *log_buf, size_t log_size);
    struct bpf_link *bpf_program__attach_tracepoint(const struct bpf_program *prog,
                                                    const char *category, const char *name);
    struct bpf_link *bpf_program__attach_trace(const struct bpf_program *prog);
    struct bpf_link *bpf_program__attach_sockmap(const struct bpf_program *prog, int map_fd);
    struct bpf_iter_link_info { uint32_t map_fd; uint32_t _rest[3]; };  /* union bpf_iter_link_info */
    struct bpf_iter_attach_opts { size_t sz; struct bpf_iter_link_info *link_info; uint32_t link_info_len; };
    struct bpf_link *bpf_program__attach_iter(const struct bpf_program *prog,
                                              const struct bpf_iter_attach_opts *opts);
    int bpf_iter_create(int link_fd);
    /* netlink tc (kernels without tcx links); `size_t :0` of libbpf.h made explicit */
    struct bpf_tc_hook { size_t sz; int ifindex; int attach_point; uint32_t parent; uint32_t _pad; };
    struct bpf_tc_opts { size_t sz; int prog_fd; uint32_t flags; uint32_t prog_id; uint32_t handle;
                         uint32_t priority; uint32_t _pad; };
    int bpf_tc_hook_create(struct bpf_tc_hook *hook);
    int bpf_tc_hook_destroy(struct bpf_tc_hook *hook);
    int bpf_tc_attach(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
    int bpf_tc_detach(const struct bpf_tc_hook *hook, const struct bpf_tc_opts *opts);

    const char *bpf_map__name(const struct bpf_map *map);
    int bpf_map__fd(const struct bpf_map *map);
    int bpf_map__type(const struct bpf_map *map);
    uint32_t bpf_map__key_size(const struct bpf_map *map);
    uint32_t bpf_map__value_size(const struct bpf_map *map);
    uint32_t bpf_map__max_entries(const struct bpf_map *map);
    int bpf_map__set_max_entries(struct bpf_map *map, uint32_t max_entries);
    bool bpf_map__is_internal(const struct bpf_map *map);
    int bpf_map__set_initial_value(struct bpf_map *map, const void *data, size_t size);
    void *bpf_map__initial_value(struct bpf_map *map, size_t *psize);
    uint32_t bpf_map__btf_key_type_id(const struct bpf_map *map);
    uint32_t bpf_map__btf_value_type_id(const struct bpf_map *map);

    int bpf_link__fd(const struct bpf_link *link);
    int bpf_link__destroy(struct bpf_link *link);
    void bpf_link__disconnect(struct bpf_link *link);

    struct btf_type { uint32_t name_off; uint32_t info; uint32_t size_or_type; };
    const struct btf_type *btf__type_by_id(const struct btf *btf, uint32_t id);
    const char *btf__name_by_offset(const struct btf *btf, uint32_t offset);
    int32_t btf__find_by_name_kind(const struct btf *btf, const char *type_name, uint32_t kind);
    struct btf *btf__load_from_kernel_by_id(uint32_t id);
    void btf__free(struct btf *btf);

    int bpf_link_create(int prog_fd, int target_fd, int attach_type, const void *opts);
    int bpf_link_detach(int link_fd);
    int bpf_prog_attach(int prog_fd, int target_fd, int attach_type, unsigned int flags);
    int bpf_prog_detach2(int prog_fd, int target_fd, int attach_type);
    int bpf_prog_query(int target_fd, int attach_type, uint32_t query_flags,
                       uint32_t *attach_flags, uint32_t *prog_ids, uint32_t *prog_cnt);
    int bpf_obj_pin(int fd, const char *pathname);
    int bpf_obj_get(const char *pathname);
    int bpf_obj_get_info_by_fd(int fd, void *info, uint32_t *info_len);
    int bpf_enable_stats(int type);   /* BPF_STATS_RUN_TIME = 0: on while the returned fd is open */
    int bpf_prog_get_fd_by_id(uint32_t id);
    int bpf_prog_get_next_id(uint32_t start_id, uint32_t *next_id);
    int bpf_map_get_fd_by_id(uint32_t id);

    int bpf_map_lookup_elem(int fd, const void *key, void *value);
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
    int bpf_map_delete_elem(int fd, const void *key);
    int bpf_map_get_next_key(int fd, const void *key, void *next_key);
    struct bpf_map_batch_opts { size_t sz; uint64_t elem_flags; uint64_t flags; };
    int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys, void *values,
                             uint32_t *count, const struct bpf_map_batch_opts *opts);

    /* Leading fields of the kernel's info structs; the kernel fills as much as we ask for. */
    struct bpf_prog_info {
        uint32_t type; uint32_t id; uint8_t tag[8];
        uint32_t jited_prog_len; uint32_t xlated_prog_len;
        uint64_t jited_prog_insns; uint64_t xlated_prog_insns; uint64_t load_time;
        uint32_t created_by_uid; uint32_t nr_map_ids; uint64_t map_ids; char name[16];
        uint32_t ifindex; uint32_t gpl_compatible; uint64_t netns_dev; uint64_t netns_ino;
        uint32_t nr_jited_ksyms; uint32_t nr_jited_func_lens; uint64_t jited_ksyms; uint64_t jited_func_lens;
        uint32_t btf_id; uint32_t func_info_rec_size; uint64_t func_info;
        uint32_t nr_func_info; uint32_t nr_line_info; uint64_t line_info; uint64_t jited_line_info;
        uint32_t nr_jited_line_info; uint32_t line_info_rec_size; uint32_t jited_line_info_rec_size;
        uint32_t nr_prog_tags; uint64_t prog_tags;
        uint64_t run_time_ns; uint64_t run_cnt;   /* counted while statistics are enabled */
    };
    struct bpf_map_info {
        uint32_t type; uint32_t id; uint32_t key_size; uint32_t value_size;
        uint32_t max_entries; uint32_t map_flags; char name[16];
        uint32_t ifindex; uint32_t btf_vmlinux_value_type_id; uint64_t netns_dev; uint64_t netns_ino;
        uint32_t btf_id; uint32_t btf_key_type_id; uint32_t btf_value_type_id; uint32_t _pad;
    };
    struct bpf_link_info {
        uint32_t type; uint32_t id; uint32_t prog_id; uint32_t _pad;
        uint64_t data[4];   /* per link type: cgroup = {cgroup_id, attach_type}; sockmap = {map_id | attach_type << 32} */
    };

    /* feature probes */
    struct bpf_insn { uint8_t code; uint8_t regs; int16_t off; int32_t imm; };
    struct bpf_prog_load_opts { size_t sz; int attempts; int expected_attach_type; };
    int bpf_prog_load(int prog_type, const char *name, const char *license, const struct bpf_insn *insns,
                      size_t insn_cnt, const struct bpf_prog_load_opts *opts);
    int bpf_map_create(int map_type, const char *name, uint32_t key_size, uint32_t value_size,
                       uint32_t max_entries, const void *opts);

    /* libc: the print callback's va_list is formatted here (cffi cannot declare va_list). */
    int vsnprintf(char *str, size_t size, const char *format, void *ap);
    """
)

_PACKAGE_LIBBPF = Path(__file__).resolve().parent / "bpf" / "libbpf.so.1"


def _open_library():
    override = os.environ.get("NETBPF_LIBBPF")
    candidates = [override] if override else []
    if not override and _PACKAGE_LIBBPF.exists():
        candidates.append(str(_PACKAGE_LIBBPF))
    candidates.append("libbpf.so.1")
    errors = []
    for name in candidates:
        try:
            return ffi.dlopen(name), name
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            if override:
                break
    raise ImportError(
        "netbpf: cannot load libbpf ("
        + "; ".join(errors)
        + "). Install it (Debian: apt-get install libbpf1) or set NETBPF_LIBBPF=/path/libbpf.so.1"
    )


lib, path = _open_library()
libc = ffi.dlopen(None)


def has(symbol):
    """Whether the loaded libbpf exports `symbol` (newer API on an older library)."""
    try:
        getattr(lib, symbol)
    except AttributeError:
        return False
    return True


def version():
    """(major, minor) of the loaded libbpf."""
    return int(lib.libbpf_major_version()), int(lib.libbpf_minor_version())
