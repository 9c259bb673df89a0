// SPDX-License-Identifier: GPL-2.0
/* The least an sk_msg program can cost on this kernel, for evaluate/floor.py: what the bypass's
 * program is measured against. Not a bypass: it takes every connection of its cgroup, however
 * its sockets read, so it runs only under the ping-pong of evaluate/, in a child cgroup.
 *
 *   floor_pass      returns SK_PASS: the kernel's cost of running any sk_msg program
 *   floor_redirect  redirects each message to the peer's socket, keyed by cookie in a sockhash
 *                   as the bypass does, with nothing looked up but the redirect's own key: the
 *                   peer's cookie, by the peer's port (loopback in one namespace: a port names
 *                   a socket there). */
#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} floor_map SEC(".maps");

__u64 cookie_by_port[65536];

SEC("sockops")
int floor_sockops(struct bpf_sock_ops *skops)
{
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	cookie_by_port[skops->local_port & 0xffff] = cookie;
	bpf_sock_hash_update(skops, &floor_map, &cookie, BPF_NOEXIST);
	return 1;
}

SEC("sk_msg")
int floor_pass(struct sk_msg_md *msg)
{
	return SK_PASS;
}

SEC("sk_msg")
int floor_redirect(struct sk_msg_md *msg)
{
	__u32 port = bpf_ntohl(msg->remote_port);

	/* A failed redirect leaves none set: SK_PASS then sends the TCP way, as in the bypass. */
	bpf_msg_redirect_hash(msg, &floor_map, &cookie_by_port[port & 0xffff], BPF_F_INGRESS);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
