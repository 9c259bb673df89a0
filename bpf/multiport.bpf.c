// SPDX-License-Identifier: GPL-2.0
/* multiport: many processes bind the same "virtual" port; each gets a free real port.
 *
 *   bind4/6        a bind to a virtual port gets port 0 (the kernel picks a free one) and the
 *                  socket remembers the virtual port in socket storage (cloned on accept)
 *   post_bind4/6   the real port is known: record real -> virtual for the tool and for clients
 *   getsockname4/6 a remapped socket reports the virtual port
 *   connect4/6     a client in the same cgroup connecting to a local address on a virtual port
 *                  reaches one of the listeners (chosen uniformly); getpeername reports the
 *                  virtual port. One that finds no listener there while connecting to a
 *                  loopback address is refused (ECONNREFUSED), as without any listener: it never
 *                  reaches a process outside the cgroup that bound the virtual port's number
 *                  itself. sendmsg/recvmsg do the same for UDP datagrams.
 *   sock_release   forget the socket
 */
#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "netbpf.h"
#include "multiport.h"

#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define SOCK_STREAM_ 1
#define SOCK_DGRAM_ 2

/* virtual_ports[port] != 0: bind()s to this port are remapped */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} virtual_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, struct mapping);
} mappings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct real_port_key);
	__type(value, struct real_port);
} real_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct sock_state);
} sock_state SEC(".maps");

const volatile __u32 allow_privileged = 0; /* remap virtual ports below 1024 (set before load) */

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct multiport_counters);
} counters SEC(".maps");

#define COUNT(field)                                            \
	do {                                                    \
		__u32 zero_ = 0;                                \
		struct multiport_counters *c_ = bpf_map_lookup_elem(&counters, &zero_); \
		if (c_)                                         \
			c_->field++;                            \
	} while (0)

static __always_inline int is_virtual(__u16 port)
{
	__u32 key = port;
	__u8 *listed = bpf_map_lookup_elem(&virtual_ports, &key);

	return listed && *listed;
}

static __always_inline __u8 protocol_of(__u32 type)
{
	return type == SOCK_DGRAM_ ? IPPROTO_UDP_ : IPPROTO_TCP_;
}

/* --- bind --- */

/* Whether an IPv6 socket takes no IPv4 (IPV6_V6ONLY; settable only before bind, so final here). */
static __always_inline __u8 v6only(struct bpf_sock *sk)
{
	struct tcp6_sock *tcp;
	struct udp6_sock *udp;

	if (sk->family != AF_INET6)
		return 0;
	tcp = bpf_skc_to_tcp6_sock(sk);
	if (tcp)
		return tcp->tcp.inet_conn.icsk_inet.sk.__sk_common.skc_ipv6only;
	udp = bpf_skc_to_udp6_sock(sk);
	return udp ? udp->udp.inet.sk.__sk_common.skc_ipv6only : 0;
}

static __always_inline int on_bind(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs(ctx->user_port);
	struct bpf_sock *sk = ctx->sk;
	struct sock_state *state;

	if (!port || !sk || !is_virtual(port))
		return 1;
	if (port < 1024 && !allow_privileged) {
		COUNT(binds_privileged_refused);
		return 1;
	}
	state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state)
		return 1;
	state->virtual_port = port;
	state->real_port = 0;
	state->v6only = v6only(sk);
	ctx->user_port = 0; /* the kernel picks a free port: a remapped bind never collides */
	COUNT(binds_remapped);
	return 1;
}

SEC("cgroup/bind4")
int mp_bind4(struct bpf_sock_addr *ctx)
{
	return on_bind(ctx);
}

SEC("cgroup/bind6")
int mp_bind6(struct bpf_sock_addr *ctx)
{
	return on_bind(ctx);
}

static __always_inline int on_post_bind(struct bpf_sock *sk, int v6)
{
	struct sock_state *state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	struct real_port_key rkey = {};
	struct real_port rval = {};
	struct mapping m = {};
	__u64 cookie;

	if (!state || !state->virtual_port || state->real_port)
		return 1;
	state->real_port = sk->src_port;
	cookie = bpf_get_socket_cookie(sk);

	m.virtual_port = state->virtual_port;
	m.real_port = sk->src_port;
	m.protocol = sk->protocol;
	m.family = sk->family;
	m.v6only = state->v6only;
	m.pid = bpf_get_current_pid_tgid() >> 32;
	m.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(m.comm, sizeof(m.comm));
	if (v6) {
		m.addr[0] = sk->src_ip6[0];
		m.addr[1] = sk->src_ip6[1];
		m.addr[2] = sk->src_ip6[2];
		m.addr[3] = sk->src_ip6[3];
	} else {
		m.addr[0] = sk->src_ip4;
	}
	if (bpf_map_update_elem(&mappings, &cookie, &m, BPF_ANY))
		COUNT(mappings_full);

	rkey.port = m.real_port;
	rkey.protocol = m.protocol;
	rval.virtual_port = m.virtual_port;
	rval.family = m.family;
	__builtin_memcpy(rval.addr, m.addr, sizeof(rval.addr));
	rval.cookie = cookie;
	rval.cgroup_id = m.cgroup_id;
	rval.v6only = m.v6only;
	if (bpf_map_update_elem(&real_ports, &rkey, &rval, BPF_ANY))
		COUNT(mappings_full);
	return 1;
}

SEC("cgroup/post_bind4")
int mp_post_bind4(struct bpf_sock *sk)
{
	return on_post_bind(sk, 0);
}

SEC("cgroup/post_bind6")
int mp_post_bind6(struct bpf_sock *sk)
{
	return on_post_bind(sk, 1);
}

/* --- names --- */

/* Show the virtual port where the address read back holds the real one: our own port
 * (getsockname) or, for a redirected client, the peer's (getpeername). */
static __always_inline int show_virtual_port(struct bpf_sock_addr *ctx, int peer)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock_state *state;
	__u16 virtual, real;

	if (!sk)
		return 1;
	state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	if (!state)
		return 1;
	virtual = peer ? state->peer_virtual : state->virtual_port;
	real = peer ? state->peer_real : state->real_port;
	if (virtual && bpf_ntohs(ctx->user_port) == real) {
		ctx->user_port = bpf_htons(virtual);
		COUNT(names_rewritten);
	}
	return 1;
}

SEC("cgroup/getsockname4")
int mp_getsockname4(struct bpf_sock_addr *ctx)
{
	return show_virtual_port(ctx, 0);
}

SEC("cgroup/getsockname6")
int mp_getsockname6(struct bpf_sock_addr *ctx)
{
	return show_virtual_port(ctx, 0);
}

SEC("cgroup/getpeername4")
int mp_getpeername4(struct bpf_sock_addr *ctx)
{
	return show_virtual_port(ctx, 1);
}

SEC("cgroup/getpeername6")
int mp_getpeername6(struct bpf_sock_addr *ctx)
{
	return show_virtual_port(ctx, 1);
}

/* --- clients: pick one listener of the virtual port, uniformly (reservoir sampling) --- */

struct pick {
	__u64 cgroup_id;
	__u32 dest[4];     /* destination address as a v6 address (v4 as ::ffff:a.b.c.d) */
	__u16 virtual_port;
	__u8 protocol;
	__u8 v4;           /* the client is IPv4 */
	__u32 seen;
	__u16 chosen;
};

static __always_inline int is_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline int is_any6(const __u32 *a)
{
	return (a[0] | a[1] | a[2] | a[3]) == 0;
}

static __always_inline int is_loopback_dest(const struct pick *p)
{
	if (p->v4)
		return (bpf_ntohl(p->dest[3]) >> 24) == 127;
	return p->dest[0] == 0 && p->dest[1] == 0 && p->dest[2] == 0 && p->dest[3] == bpf_htonl(1);
}

/* Can a socket of `family` bound to `addr` (as in struct mapping) be pick->dest, the address
 * a client sends to or a datagram comes from? A wildcard socket only through loopback: another
 * address may be another host. "::" takes IPv4 too, unless IPV6_V6ONLY. */
static __always_inline int reachable(__u8 family, __u8 v6only, const __u32 *addr, const struct pick *p)
{
	if (family == AF_INET)
		return p->v4 && (addr[0] == p->dest[3] || (addr[0] == 0 && is_loopback_dest(p)));
	if (is_any6(addr))
		return is_loopback_dest(p) && !(p->v4 && v6only);
	return addr[0] == p->dest[0] && addr[1] == p->dest[1] && addr[2] == p->dest[2] && addr[3] == p->dest[3];
}

/* pick->dest from the address in ctx (v6 as is, v4 as ::ffff:a.b.c.d) */
static __always_inline void set_dest(struct pick *p, struct bpf_sock_addr *ctx, int v6)
{
	if (v6) {
		p->dest[0] = ctx->user_ip6[0];
		p->dest[1] = ctx->user_ip6[1];
		p->dest[2] = ctx->user_ip6[2];
		p->dest[3] = ctx->user_ip6[3];
		p->v4 = is_v4_mapped(p->dest);
	} else {
		p->dest[2] = bpf_htonl(0xffff);
		p->dest[3] = ctx->user_ip4;
		p->v4 = 1;
	}
}

static long consider(struct bpf_map *map, __u64 *cookie, struct mapping *m, struct pick *p)
{
	if (m->cgroup_id != p->cgroup_id || m->virtual_port != p->virtual_port ||
	    m->protocol != p->protocol || !reachable(m->family, m->v6only, m->addr, p))
		return 0;
	p->seen++;
	if (bpf_get_prandom_u32() % p->seen == 0)
		p->chosen = m->real_port;
	return 0;
}

/* The real port to use instead of virtual port `port` at `dest`, or 0; `loopback` says whether
 * dest is a loopback address. */
static __always_inline __u16 choose_listener(struct bpf_sock_addr *ctx, __u16 port, __u8 protocol, int v6,
					     int *loopback)
{
	struct pick p = { .virtual_port = port, .protocol = protocol };

	*loopback = 0;
	if (!is_virtual(port))
		return 0;
	p.cgroup_id = bpf_get_current_cgroup_id();
	set_dest(&p, ctx, v6);
	*loopback = is_loopback_dest(&p);
	bpf_for_each_map_elem(&mappings, consider, &p, 0);
	return p.chosen;
}

static __always_inline int on_connect(struct bpf_sock_addr *ctx, int v6)
{
	__u16 port = bpf_ntohs(ctx->user_port), real;
	struct bpf_sock *sk = ctx->sk;
	struct sock_state *state;
	int loopback;

	if (!sk || !is_virtual(port))
		return 1;
	real = choose_listener(ctx, port, protocol_of(ctx->type), v6, &loopback);
	if (!real) {
		COUNT(connects_no_listener);
		/* Port 0 has no listener anywhere: the connect fails as if none listened on the
		 * virtual port, instead of reaching whoever outside the cgroup bound its number. */
		if (loopback && ctx->type == SOCK_STREAM_)
			ctx->user_port = 0;
		return 1;
	}
	state = bpf_sk_storage_get(&sock_state, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state)
		return 1;
	state->peer_virtual = port;
	state->peer_real = real;
	ctx->user_port = bpf_htons(real);
	COUNT(connects_redirected);
	return 1;
}

SEC("cgroup/connect4")
int mp_connect4(struct bpf_sock_addr *ctx)
{
	return on_connect(ctx, 0);
}

SEC("cgroup/connect6")
int mp_connect6(struct bpf_sock_addr *ctx)
{
	return on_connect(ctx, 1);
}

/* UDP without connect(): each datagram to a virtual port goes to a listener... */
static __always_inline int on_sendmsg(struct bpf_sock_addr *ctx, int v6)
{
	__u16 port = bpf_ntohs(ctx->user_port), real;
	int loopback;

	real = choose_listener(ctx, port, IPPROTO_UDP_, v6, &loopback);
	if (real) {
		ctx->user_port = bpf_htons(real);
		COUNT(datagrams_redirected);
	}
	return 1;
}

SEC("cgroup/sendmsg4")
int mp_sendmsg4(struct bpf_sock_addr *ctx)
{
	return on_sendmsg(ctx, 0);
}

SEC("cgroup/sendmsg6")
int mp_sendmsg6(struct bpf_sock_addr *ctx)
{
	return on_sendmsg(ctx, 1);
}

/* ...and replies from a remapped socket appear to come from its virtual port: a datagram whose
 * source port is a real port, from an address that socket can send from (another host may use
 * the same port number). */
static __always_inline int on_recvmsg(struct bpf_sock_addr *ctx, int v6)
{
	struct real_port_key key = { .port = bpf_ntohs(ctx->user_port), .protocol = IPPROTO_UDP_ };
	struct real_port *rp = bpf_map_lookup_elem(&real_ports, &key);
	struct pick source = {};

	if (!rp || rp->cgroup_id != bpf_get_current_cgroup_id())
		return 1;
	set_dest(&source, ctx, v6);
	if (!reachable(rp->family, rp->v6only, rp->addr, &source))
		return 1;
	ctx->user_port = bpf_htons(rp->virtual_port);
	COUNT(names_rewritten);
	return 1;
}

SEC("cgroup/recvmsg4")
int mp_recvmsg4(struct bpf_sock_addr *ctx)
{
	return on_recvmsg(ctx, 0);
}

SEC("cgroup/recvmsg6")
int mp_recvmsg6(struct bpf_sock_addr *ctx)
{
	return on_recvmsg(ctx, 1);
}

/* --- release --- */

SEC("cgroup/sock_release")
int mp_sock_release(struct bpf_sock *sk)
{
	struct sock_state *state = bpf_sk_storage_get(&sock_state, sk, 0, 0);
	struct real_port_key rkey = {};
	struct real_port *rp;
	__u64 cookie;

	if (!state || !state->real_port)
		return 1;
	cookie = bpf_get_socket_cookie(sk);
	if (bpf_map_delete_elem(&mappings, &cookie) == 0)
		COUNT(released);
	rkey.port = state->real_port;
	rkey.protocol = sk->protocol;
	rp = bpf_map_lookup_elem(&real_ports, &rkey);
	if (rp && rp->cookie == cookie)
		bpf_map_delete_elem(&real_ports, &rkey);
	return 1;
}

/* --- --mode tracepoint: the original design, getsockname() rewritten in user memory ---
 * Loaded only in that mode. bpf_probe_write_user is refused under kernel lockdown, where the
 * load fails and the tool says so. Binds still go through the cgroup hooks above. */

struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} target_cgroup SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);   /* pid_tgid: one getsockname() in flight per thread */
	__type(value, __u64); /* the caller's struct sockaddr * */
} getsockname_calls SEC(".maps");

SEC("tracepoint/syscalls/sys_enter_getsockname")
int mp_tp_enter_getsockname(struct trace_event_raw_sys_enter *ctx)
{
	__u64 id = bpf_get_current_pid_tgid(), addr = ctx->args[1];

	if (bpf_current_task_under_cgroup(&target_cgroup, 0) == 1)
		bpf_map_update_elem(&getsockname_calls, &id, &addr, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_getsockname")
int mp_tp_exit_getsockname(struct trace_event_raw_sys_exit *ctx)
{
	struct real_port_key key = {};
	__u64 id = bpf_get_current_pid_tgid(), *addr;
	struct { __u16 family; __u16 port; } sa;
	struct real_port *rp;
	__u16 virtual_be;

	addr = bpf_map_lookup_elem(&getsockname_calls, &id);
	if (!addr)
		return 0;
	if (ctx->ret == 0 && bpf_probe_read_user(&sa, sizeof(sa), (void *)*addr) == 0 &&
	    (sa.family == AF_INET || sa.family == AF_INET6)) {
		key.port = bpf_ntohs(sa.port);
		key.protocol = IPPROTO_TCP_;
		rp = bpf_map_lookup_elem(&real_ports, &key);
		if (!rp) {
			key.protocol = IPPROTO_UDP_;
			rp = bpf_map_lookup_elem(&real_ports, &key);
		}
		if (rp) {
			virtual_be = bpf_htons(rp->virtual_port);
			if (bpf_probe_write_user((void *)*addr + 2, &virtual_be, sizeof(virtual_be)) == 0)
				COUNT(names_rewritten);
		}
	}
	bpf_map_delete_elem(&getsockname_calls, &id);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
