// SPDX-License-Identifier: GPL-2.0
// A program the verifier must refuse: it dereferences a map value without a NULL check.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} counter SEC(".maps");

SEC("cgroup/bind4")
int unchecked_lookup(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	__u64 *value = bpf_map_lookup_elem(&counter, &zero);

	*value += 1;
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
