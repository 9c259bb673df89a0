// SPDX-License-Identifier: GPL-2.0
/* bypass: local TCP connections skip the TCP/IP stack.
 *
 * sockops puts each established socket whose peer is local into sock_map, keyed by its full
 * tuple, when both ends of the connection join (enum sock_join in bypass.h says how). sk_msg, run on every send of a socket in the map, moves the message straight into the
 * peer socket's receive queue (bpf_msg_redirect_hash with BPF_F_INGRESS) when that is safe, and
 * otherwise lets it take the normal TCP path. Redirection is safe when:
 *   - the peer is in the map;
 *   - the peer has read everything we ever sent the TCP way (our write_seq == its copied_seq):
 *     the receiver drains redirected data before its TCP queue, so redirecting while TCP data is
 *     unread would reorder the stream;
 *   - the peer's receive queue is under its limit: the redirect path has no backpressure of its
 *     own, so past the limit sends go the TCP way, whose window stops the sender.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "netbpf.h"
#include "bypass.h"

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
} sock_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, struct sock_info);
} sock_info SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct listener_key);
	__type(value, __u64); /* how many sockets listen there (SO_REUSEPORT) */
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bypass_config);
} config_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct host_addr);
	__type(value, __u8);
} host_addrs SEC(".maps");

/* allowed_ports[port] != 0: the --ports allowlist, one byte per port */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} allowed_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bypass_counters);
} counters SEC(".maps");

static __always_inline struct bypass_counters *counters_here(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&counters, &zero);
}

/* IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes plain IPv4, so that a v6 socket talking to a v4 one
 * builds the same key its peer does. */
static __always_inline void normalize(struct sock_key *key)
{
	if (key->family == AF_INET6 && key->local_ip[0] == 0 && key->local_ip[1] == 0 &&
	    key->local_ip[2] == bpf_htonl(0xffff)) {
		key->family = AF_INET;
		key->local_ip[0] = key->local_ip[3];
		key->remote_ip[0] = key->remote_ip[3];
		key->local_ip[1] = key->local_ip[2] = key->local_ip[3] = 0;
		key->remote_ip[1] = key->remote_ip[2] = key->remote_ip[3] = 0;
	}
}

/* bpf_sock_ops and sk_msg_md name these fields alike; remote_port is network order in the
 * upper half, local_port host order. Every field is loaded before any is chosen (the barrier):
 * the verifier only accepts context loads at constant offsets, and clang would otherwise turn
 * "v4 ? ip4 : ip6[0]" into one load from a computed address. */
#define FILL_KEY(key, ctx)                                                          \
	do {                                                                        \
		__u32 family_ = (ctx)->family, l4_ = (ctx)->local_ip4;              \
		__u32 r4_ = (ctx)->remote_ip4;                                      \
		__u32 l6_[4] = { (ctx)->local_ip6[0], (ctx)->local_ip6[1],          \
				 (ctx)->local_ip6[2], (ctx)->local_ip6[3] };        \
		__u32 r6_[4] = { (ctx)->remote_ip6[0], (ctx)->remote_ip6[1],        \
				 (ctx)->remote_ip6[2], (ctx)->remote_ip6[3] };      \
		__u32 lport_ = (ctx)->local_port, rport_ = (ctx)->remote_port;      \
		asm volatile("" ::: "memory");                                      \
		(key)->family = family_;                                            \
		if (family_ == AF_INET) {                                           \
			(key)->local_ip[0] = l4_;                                   \
			(key)->remote_ip[0] = r4_;                                  \
		} else {                                                            \
			__builtin_memcpy((key)->local_ip, l6_, sizeof(l6_));       \
			__builtin_memcpy((key)->remote_ip, r6_, sizeof(r6_));      \
		}                                                                   \
		(key)->local_port = lport_;                                         \
		(key)->remote_port = bpf_ntohl(rport_);                             \
		normalize(key);                                                     \
	} while (0)

/* Not inlined: one copy of the context reads, which the verifier wants at fixed offsets. */
static __noinline void key_of_sockops(struct bpf_sock_ops *skops, struct sock_key *key)
{
	FILL_KEY(key, skops);
}

/* The key of the other end of the connection: the same tuple seen from there. */
static __always_inline void peer_of(const struct sock_key *key, struct sock_key *peer)
{
	peer->family = key->family;
	__builtin_memcpy(peer->local_ip, key->remote_ip, sizeof(peer->local_ip));
	__builtin_memcpy(peer->remote_ip, key->local_ip, sizeof(peer->remote_ip));
	peer->local_port = key->remote_port;
	peer->remote_port = key->local_port;
}

static __always_inline int is_loopback(const struct sock_key *key)
{
	if (key->family == AF_INET)
		return (bpf_ntohl(key->remote_ip[0]) >> 24) == 127;
	return key->remote_ip[0] == 0 && key->remote_ip[1] == 0 && key->remote_ip[2] == 0 &&
	       key->remote_ip[3] == bpf_htonl(1);
}

static __always_inline int in_scope(const struct bypass_config *cfg, const struct sock_key *key)
{
	struct host_addr addr = { .family = key->family };

	if (cfg->scope == SCOPE_ALL || is_loopback(key))
		return 1;
	if (cfg->scope != SCOPE_HOST)
		return 0;
	__builtin_memcpy(addr.ip, key->remote_ip, sizeof(addr.ip));
	return bpf_map_lookup_elem(&host_addrs, &addr) != NULL;
}

static __always_inline int port_listed(__u32 port)
{
	__u8 *listed = bpf_map_lookup_elem(&allowed_ports, &port);

	return listed && *listed;
}

static __always_inline int port_allowed(const struct bypass_config *cfg, const struct sock_key *key)
{
	return !cfg->ports_only || port_listed(key->local_port) || port_listed(key->remote_port);
}

static __always_inline void listener_of(struct listener_key *lk, const struct sock_key *key, int remote)
{
	lk->family = key->family;
	__builtin_memcpy(lk->ip, remote ? key->remote_ip : key->local_ip, sizeof(lk->ip));
	lk->port = remote ? key->remote_port : key->local_port;
}

static __always_inline void on_listen(struct bpf_sock_ops *skops)
{
	struct listener_key lk = {};
	struct sock_key key = {};
	__u64 one = 1, *count;

	key_of_sockops(skops, &key);
	listener_of(&lk, &key, 0);
	count = bpf_map_lookup_elem(&listeners, &lk);
	if (count)
		__sync_fetch_and_add(count, 1);
	else
		bpf_map_update_elem(&listeners, &lk, &one, BPF_NOEXIST);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void on_listener_closed(struct bpf_sock_ops *skops)
{
	struct listener_key lk = {};
	struct sock_key key = {};
	__u64 *count;

	key_of_sockops(skops, &key);
	listener_of(&lk, &key, 0);
	count = bpf_map_lookup_elem(&listeners, &lk);
	if (count && __sync_fetch_and_add(count, -1) <= 1)
		bpf_map_delete_elem(&listeners, &lk);
}

/* Is the server this client connected to a listener of the cgroup? Exact address, the family's
 * wildcard, or (IPv4 client) a dual-stack "::" listener. */
static __always_inline int server_will_join(const struct sock_key *key)
{
	struct listener_key lk = {};

	listener_of(&lk, key, 1);
	if (bpf_map_lookup_elem(&listeners, &lk))
		return 1;
	__builtin_memset(lk.ip, 0, sizeof(lk.ip));
	if (bpf_map_lookup_elem(&listeners, &lk))
		return 1;
	lk.family = AF_INET6;
	return key->family == AF_INET && bpf_map_lookup_elem(&listeners, &lk);
}

/* Insert this end into the map; a server end only when its client is there to confirm. */
static __always_inline void on_established(struct bpf_sock_ops *skops, int active)
{
	struct bypass_counters *cnt = counters_here();
	struct sock_key key = {}, peer_key = {};
	struct sock_info info = {}, *client;
	struct bypass_config *cfg;
	__u32 zero = 0, flags = BPF_SOCK_OPS_STATE_CB_FLAG;

	if (skops->family != AF_INET && skops->family != AF_INET6)
		return;
	cfg = bpf_map_lookup_elem(&config_map, &zero);
	if (!cfg || !cnt || !skops->sk)
		return;
	key_of_sockops(skops, &key);
	if (!in_scope(cfg, &key) || !port_allowed(cfg, &key))
		return;

	if (active) {
		if (!server_will_join(&key)) {
			cnt->peer_not_bypassed++;
			return;
		}
		info.join = JOIN_PENDING;
		flags |= BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG; /* to hear of the first packet */
	} else {
		peer_of(&key, &peer_key);
		client = bpf_map_lookup_elem(&sock_info, &peer_key);
		if (!client || __sync_val_compare_and_swap(&client->join, JOIN_PENDING, JOIN_CONFIRMED) !=
				       JOIN_PENDING) {
			cnt->peer_not_bypassed++;
			return;
		}
		info.join = JOIN_CONFIRMED;
	}
	info.sk = (__u64)skops->sk;
	if (bpf_map_update_elem(&sock_info, &key, &info, BPF_NOEXIST) ||
	    bpf_sock_hash_update(skops, &sock_map, &key, BPF_NOEXIST)) {
		bpf_map_delete_elem(&sock_info, &key);
		cnt->insert_failed++;
		return;
	}
	cnt->sockets_inserted++;
	/* STATE_CB: hear of TCP_CLOSE and drop sock_info (the sockhash forgets closed sockets) */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | flags);
}

/* A client end receives its first packet after establishing: by then its server end has joined
 * if it ever will. If it has not, the client leaves the map. */
static __always_inline void on_first_packet(struct bpf_sock_ops *skops)
{
	struct bypass_counters *cnt = counters_here();
	struct sock_key key = {};
	struct sock_info *info;

	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG);
	key_of_sockops(skops, &key);
	info = bpf_map_lookup_elem(&sock_info, &key);
	if (!info || __sync_val_compare_and_swap(&info->join, JOIN_PENDING, JOIN_EVICTED) != JOIN_PENDING)
		return;
	bpf_map_delete_elem(&sock_map, &key);
	bpf_map_delete_elem(&sock_info, &key);
	if (cnt)
		cnt->evicted_lonely++;
}

SEC("sockops")
int bypass_sockops(struct bpf_sock_ops *skops)
{
	struct sock_key key = {};

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_established(skops, 1);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_established(skops, 0);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		on_listen(skops);
		break;
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		on_first_packet(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[0] == TCP_LISTEN && skops->args[1] == TCP_CLOSE) {
			on_listener_closed(skops);
		} else if (skops->args[1] == TCP_CLOSE) {
			key_of_sockops(skops, &key);
			bpf_map_delete_elem(&sock_info, &key);
		}
		break;
	}
	return 1;
}

static __always_inline int pass(struct bypass_counters *cnt, __u64 *reason, __u32 size)
{
	(*reason)++;
	cnt->passed_msgs++;
	cnt->passed_bytes += size;
	return SK_PASS;
}

SEC("sk_msg")
int bypass_sk_msg(struct sk_msg_md *msg)
{
	struct bypass_counters *cnt = counters_here();
	struct sock_key key = {}, peer_key = {};
	struct bypass_config *cfg;
	struct sock_info *peer;
	struct tcp_sock *self;
	struct sock *psk;
	__u32 zero = 0, size = msg->size;
	int rmem, limit;

	if (!cnt)
		return SK_PASS;
	cfg = bpf_map_lookup_elem(&config_map, &zero);
	FILL_KEY(&key, msg);
	peer_of(&key, &peer_key);
	peer = bpf_map_lookup_elem(&sock_info, &peer_key);
	if (!peer || !cfg || !msg->sk)
		return pass(cnt, &cnt->passed_no_peer, size);

	self = bpf_skc_to_tcp_sock(msg->sk);
	psk = (struct sock *)peer->sk;
	if (!self || self->write_seq != BPF_CORE_READ((struct tcp_sock *)psk, copied_seq))
		return pass(cnt, &cnt->passed_unread_plain, size);

	rmem = BPF_CORE_READ(psk, sk_backlog.rmem_alloc.counter);
	limit = NETBPF_MAX(BPF_CORE_READ(psk, sk_rcvbuf), (int)cfg->queue_floor);
	if (rmem + (int)size > limit)
		return pass(cnt, &cnt->passed_peer_full, size);

	/* On failure the helper leaves no redirect set, so SK_PASS sends the TCP way: never drop. */
	if (bpf_msg_redirect_hash(msg, &sock_map, &peer_key, BPF_F_INGRESS) != SK_PASS)
		return pass(cnt, &cnt->redirect_failed, size);
	cnt->redirected_msgs++;
	cnt->redirected_bytes += size;
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
