// SPDX-License-Identifier: GPL-2.0
// Small programs, one per program type the loader supports, each recording that it ran.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

enum event { EV_BIND, EV_POST_BIND, EV_CONNECT, EV_GETSOCKNAME, EV_GETPEERNAME, EV_RELEASE,
             EV_SOCKOPS_ESTABLISHED, EV_SK_MSG, EV_TRACEPOINT, EV_MAX };

struct event_key {
	__u32 event;
	__u32 family;
};

struct event_value {
	__u64 count;
	__u32 last_pid;
	__u16 last_port;  // host byte order
	char comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct event_key);
	__type(value, struct event_value);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, EV_MAX);
	__type(key, __u32);
	__type(value, __u64);
} percpu_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 64);
	__type(key, __u64);   // socket cookie of the local end
	__type(value, __u64);
} socks SEC(".maps");

// When nonzero, bind4 rewrites port `remap_from` to `remap_to`: an effect a test can see.
struct remap { __u16 from; __u16 to; };
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct remap);
} remap_config SEC(".maps");

/* with_task: the program type may call bpf_get_current_pid_tgid/comm (sockops and sk_msg
 * could not before 6.x kernels) */
static __always_inline void record_event(__u32 ev, __u32 family, __u16 port, int with_task)
{
	struct event_key key = { .event = ev, .family = family };
	struct event_value init = {}, *val;

	val = bpf_map_lookup_elem(&events, &key);
	if (!val) {
		bpf_map_update_elem(&events, &key, &init, BPF_NOEXIST);
		val = bpf_map_lookup_elem(&events, &key);
		if (!val)
			return;
	}
	__sync_fetch_and_add(&val->count, 1);
	val->last_port = port;
	if (with_task) {
		val->last_pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(val->comm, sizeof(val->comm));
	}

	__u64 *pc = bpf_map_lookup_elem(&percpu_counts, &ev);
	if (pc)
		*pc += 1;
}

#define record(ev, family, port) record_event(ev, family, port, 1)

SEC("cgroup/bind4")
int on_bind4(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	struct remap *r = bpf_map_lookup_elem(&remap_config, &zero);
	__u16 port = bpf_ntohs(ctx->user_port);

	record(EV_BIND, AF_INET, port);
	if (r && r->from && r->from == port)
		ctx->user_port = bpf_htons(r->to);
	return 1;
}

SEC("cgroup/bind6")
int on_bind6(struct bpf_sock_addr *ctx)
{
	record(EV_BIND, AF_INET6, bpf_ntohs(ctx->user_port));
	return 1;
}

SEC("cgroup/post_bind4")
int on_post_bind4(struct bpf_sock *sk)
{
	record(EV_POST_BIND, AF_INET, sk->src_port);
	return 1;
}

SEC("cgroup/post_bind6")
int on_post_bind6(struct bpf_sock *sk)
{
	record(EV_POST_BIND, AF_INET6, sk->src_port);
	return 1;
}

SEC("cgroup/connect4")
int on_connect4(struct bpf_sock_addr *ctx)
{
	record(EV_CONNECT, AF_INET, bpf_ntohs(ctx->user_port));
	return 1;
}

SEC("cgroup/connect6")
int on_connect6(struct bpf_sock_addr *ctx)
{
	record(EV_CONNECT, AF_INET6, bpf_ntohs(ctx->user_port));
	return 1;
}

SEC("cgroup/getsockname4")
int on_getsockname4(struct bpf_sock_addr *ctx)
{
	record(EV_GETSOCKNAME, AF_INET, bpf_ntohs(ctx->user_port));
	return 1;
}

SEC("cgroup/getsockname6")
int on_getsockname6(struct bpf_sock_addr *ctx)
{
	record(EV_GETSOCKNAME, AF_INET6, bpf_ntohs(ctx->user_port));
	return 1;
}

SEC("cgroup/getpeername4")
int on_getpeername4(struct bpf_sock_addr *ctx)
{
	record(EV_GETPEERNAME, AF_INET, bpf_ntohs(ctx->user_port));
	return 1;
}

SEC("cgroup/getpeername6")
int on_getpeername6(struct bpf_sock_addr *ctx)
{
	record(EV_GETPEERNAME, AF_INET6, bpf_ntohs(ctx->user_port));
	return 1;
}

SEC("cgroup/sock_release")
int on_release(struct bpf_sock *sk)
{
	record(EV_RELEASE, sk->family, 0);  // src_port is readable in post_bind only
	return 1;
}

SEC("sockops")
int on_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB ||
	    skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		__u64 cookie = bpf_get_socket_cookie(skops);

		record_event(EV_SOCKOPS_ESTABLISHED, skops->family, skops->local_port, 0);
		bpf_sock_hash_update(skops, &socks, &cookie, BPF_ANY);
	}
	return 1;
}

SEC("sk_msg")
int on_sk_msg(struct sk_msg_md *msg)
{
	record_event(EV_SK_MSG, msg->family, msg->local_port, 0);
	return SK_PASS;
}

SEC("tracepoint/syscalls/sys_enter_getsockname")
int on_getsockname_tp(void *ctx)
{
	record(EV_TRACEPOINT, 0, 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
