// SPDX-License-Identifier: GPL-2.0
/* Global data, in the style of libbpf-bootstrap's minimal example: settings that are fixed
 * before load (.rodata), a switch user space may flip while loaded (.data), a counter (.bss). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

const volatile int target_pid = 0; /* whose getsockname() calls count */
const volatile __u64 step = 1;     /* added per call */
__u32 enabled = 1;
__u64 calls;

SEC("tracepoint/syscalls/sys_enter_getsockname")
int count_getsockname(void *ctx)
{
	if (!enabled || (bpf_get_current_pid_tgid() >> 32) != target_pid)
		return 0;
	__sync_fetch_and_add(&calls, step);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
