// SPDX-License-Identifier: GPL-2.0
/* bypass: local TCP connections skip the TCP/IP stack, and no program can tell.
 *
 * Any socket in a sockhash gets the kernel's tcp_bpf receive path, which differs from TCP for
 * blocking readers (a signal or any wake-up without data turns a blocking recv() into EAGAIN,
 * whatever was redirected), and splice never sees redirected data. So a socket joins only
 * while its file is non-blocking, and data is redirected into it only once netbpf has seen its
 * owner read it without splice (enum sock_state in bypass.h):
 *
 *   sockops       counts the connections of the cgroup as they establish, notes the ports the
 *                 cgroup listens on and the network namespaces its connections live in;
 *   bypass_join_tc  a tc program on lo's ingress: on each loopback segment that takes the TCP
 *                 path it looks up both ends (bpf_sk_lookup_tcp) and inserts them into
 *                 sock_map once both qualify: a connection joins on its first segment after
 *                 that, so a joined connection (whose sends no longer make segments) stops
 *                 paying for it. tc programs may update a sockmap; the lookup runs in the
 *                 softirq, where no socket lock of ours is held;
 *   bypass_sweep_files, bypass_sweep_tcp  the agent's sweep, one of two iterators (the first
 *                 the kernel's verifier accepts): over every process's open files
 *                 (iter/task_file, every network namespace), or over the TCP sockets of one
 *                 namespace (iter/tcp, run by the agent in each namespace the cgroup uses).
 *                 It joins what the tc program cannot see (other namespaces, a kernel that
 *                 refuses the tc program), and takes a JOINED socket out again once its
 *                 redirected queue is read, when it turns blocking or spliced, or on detach;
 *   tracepoints   mark a socket read with splice() or used as sendfile()'s source, and its
 *                 service, whose later connections then never receive a redirect;
 *   sk_msg        on every send of a socket in the map, moves the message straight into its
 *                 proven peer's receive queue (bpf_msg_redirect_hash, BPF_F_INGRESS) when that
 *                 is safe, and otherwise lets it take the normal TCP path. It is safe when
 *                   - the sender has not shut its sending side down (TCP: EPIPE);
 *                   - the peer is JOINED, has read from its socket (not by splice), and has
 *                     not spliced nor set SO_RCVLOWAT since;
 *                   - the peer has read everything we ever sent the TCP way (our write_seq ==
 *                     its copied_seq): the receiver drains redirected data before its TCP queue;
 *                   - the peer's receive queue is under its limit: the redirect path has no
 *                     backpressure of its own, so past the limit sends go the TCP way.
 *
 * The proof. Addresses, ports and network namespaces are things any user can make (a namespace
 * of its own through a user namespace, this host's address on its lo, a pair with another
 * connection's exact tuple there), so they never decide where bytes go. A socket's peer is the
 * one socket the kernel itself delivers its segments to, and each end records the other's
 * cookie once, when that is proven (sock_info.peer; sk_msg redirects only there, and only while
 * both name each other):
 *   - the tc program looks both ends of a segment up in the namespace the segment travels in
 *     (bpf_sk_lookup_tcp): the kernel's own answer;
 *   - the sweep takes, within one namespace, the one live socket whose tuple mirrors this one's
 *     (sock_tuples: a tuple names one live connection end in a namespace);
 *   - between namespaces (pods on a veth pair) and through address translation, by nonces in
 *     a TCP option (SipHash of a socket's cookie under a key only the tool knows): the active
 *     end sends its own on its first segments after the handshake, the passive end reads it from
 *     the segment that completes its own handshake and answers with its own, and the active end
 *     must receive that answer (handshakes). Only the socket the kernel delivered the first
 *     segment to has the first nonce, and only the socket the kernel delivers the answer from
 *     sends it to the active end. A nonce received by two sockets proves neither (a conflict,
 *     counted).
 * A live socket's entry is keyed by its cookie and is never replaced by another socket's.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "netbpf.h"
#include "bypass.h"
#include "siphash.h"

/* A read-only view of a kernel object: loads through it are plain loads the JIT guards against
 * faults, where BPF_CORE_READ calls a helper. Where the kernel lacks it (before 6.2) the
 * program that uses it is refused and bypass_msg_read, which reads by helper, runs instead. */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;

#define O_NONBLOCK 04000
/* sk_user_data holds the psock with flag bits in its low bits (SK_USER_DATA_*) */
#define SK_USER_DATA_PTRMASK (~7UL)
/* a leaving socket stays this long after its queue was last seen empty: a redirect that
 * passed sk_msg's check just before the socket started leaving may still be on its way */
#define LEAVE_GRACE_NS (50 * 1000 * 1000ULL)

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define TC_ACT_UNSPEC (-1) /* tcx: the next program; netlink tc: the filter's default */

/* The handshake nonce's TCP option: experimental kind 254 with a 16-bit ExID (RFC 6994), "NB" */
#define TCPOPT_EXP 254
#define NONCE_EXID_0 'N'
#define NONCE_EXID_1 'B'
#define NONCE_SEGMENTS 2 /* segments that carry it: the handshake's last ACK, and the first data
			  * (which completes the handshake instead where the listener defers accept) */

/* Keyed by socket cookie (sock_info.cookie): sk_msg redirects through it on every message, and
 * an 8-byte key hashes in a fraction of a 40-byte one's time. Cookies are never reused, so an
 * entry left from a closed peer cannot name another socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} sock_map SEC(".maps");

/* Each socket's entry, by its cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct sock_info);
} sock_info SEC(".maps");

/* The cookie of the live socket each tuple names, in its namespace: where the sweep finds a
 * socket's peer within one namespace. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u64);
} sock_tuples SEC(".maps");

/* The nonces active ends sent, by nonce: what their passive ends claim (struct handshake). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct handshake);
} handshakes SEC(".maps");

/* ports the cgroup listens on (value: the agent round that last saw the listener open), to tell
 * the server end of a connection from the client end; the agent forgets closed ones */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} listeners SEC(".maps");

/* server ports whose connections were read with splice: their later connections stay plain */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} spliced_services SEC(".maps");

/* network namespaces (inode numbers) where connections of the cgroup were established (value:
 * the agent round of the last one): where an iter/tcp sweep has to look */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} netns_seen SEC(".maps");

/* network namespaces whose lo carries the tc program: there it joins loopback pairs, and the
 * agent need not hurry to */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} event_netns SEC(".maps");

/* How many connections of the cgroup, established since the attach and not closed, have each
 * local port (sockops counts them in and out). The tc program runs on every loopback segment of
 * its namespace; a segment to a port that no such connection has is none of its business, and
 * it leaves at once: the host's other loopback traffic pays an array load, not a socket lookup.
 * Connections older than the attach are not counted: the sweep joins those. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} cgroup_ports SEC(".maps");

/* Settings fixed before load (the tool writes .rodata): the verifier prunes what they rule out. */
const volatile __u64 cgroup_id = 0;      /* the cgroup (v2 id: its directory's inode) whose sockets may join */
const volatile __u32 scope = SCOPE_LOOPBACK; /* enum bypass_scope */
const volatile __u32 ports_only = 0;     /* 1: only connections with an end in allowed_ports */
const volatile __u32 queue_floor = 0;    /* bytes a peer may have queued before sends fall back to TCP, at least */
const volatile __u32 allow_blocking = 0; /* 1: blocking readers join too (the user accepts tcp_bpf's EAGAIN) */
const volatile __u64 nonce_key[2] = {};  /* the handshake nonces' SipHash key: random, from the tool */


struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bypass_control);
} control SEC(".maps");

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

static __always_inline struct bypass_control *control_here(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&control, &zero);
}

/* Detach is in progress, or the agent has not been heard from for AGENT_LOST_NS (it writes
 * agent_seen_ns about once a second, idle or not): a bypass whose agent was killed, with
 * programs that outlive it (pins, a netlink tc filter), stops joining and redirecting instead of
 * running without anyone to take out sockets that turn blocking or close. */
static __always_inline int stopped(const struct bypass_control *ctl)
{
	return ctl->detaching ||
	       (ctl->agent_seen_ns && bpf_ktime_get_ns() - ctl->agent_seen_ns > AGENT_LOST_NS);
}

static __always_inline int detaching(void)
{
	struct bypass_control *ctl = control_here();

	return !ctl || stopped(ctl);
}

/* sk_msg's view of stopped(), per CPU: the clock costs a helper call, a message only a load of
 * jiffies (bpf_jiffies64 is inlined), so the agent-lost half is looked at again once a jiffy
 * has passed since this CPU last did. Detach is seen at once. */
struct stop_seen {
	__u64 jiffies;
	__u32 stopped;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct stop_seen);
} stop_seen SEC(".maps");

static __always_inline int sends_stopped(void)
{
	struct bypass_control *ctl = control_here();
	struct stop_seen *seen;
	__u32 zero = 0;
	__u64 now;

	if (!ctl || ctl->detaching)
		return 1;
	seen = bpf_map_lookup_elem(&stop_seen, &zero);
	if (!seen)
		return 1;
	now = bpf_jiffies64();
	if (seen->jiffies != now) {
		seen->jiffies = now;
		seen->stopped = stopped(ctl);
	}
	return seen->stopped;
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

static __always_inline int is_loopback(const struct sock_key *key)
{
	if (key->family == AF_INET)
		return (bpf_ntohl(key->remote_ip[0]) >> 24) == 127;
	return key->remote_ip[0] == 0 && key->remote_ip[1] == 0 && key->remote_ip[2] == 0 &&
	       key->remote_ip[3] == bpf_htonl(1);
}

/* The network namespace of a socket: the inode number of /proc/PID/ns/net. */
static __always_inline __u32 netns_of(struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

/* The key of a socket (tc, the sweeps, the tracepoints, sockops), in its network namespace. */
static __always_inline void key_of_sock(struct sock *sk, struct sock_key *key)
{
	key->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (key->family == AF_INET) {
		key->local_ip[0] = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		key->remote_ip[0] = BPF_CORE_READ(sk, __sk_common.skc_daddr);
	} else {
		BPF_CORE_READ_INTO(&key->local_ip, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32);
		BPF_CORE_READ_INTO(&key->remote_ip, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32);
	}
	key->local_port = BPF_CORE_READ(sk, __sk_common.skc_num);
	key->remote_port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	normalize(key);
	key->netns = netns_of(sk);
}

/* The key the other end of the connection has when it lives in the same namespace. */
static __always_inline void peer_of(const struct sock_key *key, struct sock_key *peer)
{
	peer->family = key->family;
	peer->netns = key->netns;
	__builtin_memcpy(peer->local_ip, key->remote_ip, sizeof(peer->local_ip));
	__builtin_memcpy(peer->remote_ip, key->local_ip, sizeof(peer->remote_ip));
	peer->local_port = key->remote_port;
	peer->remote_port = key->local_port;
}

static __always_inline int in_scope(const struct sock_key *key)
{
	struct host_addr addr = { .family = key->family };

	if (scope == SCOPE_ALL || is_loopback(key))
		return 1;
	if (scope != SCOPE_HOST)
		return 0;
	__builtin_memcpy(addr.ip, key->remote_ip, sizeof(addr.ip));
	return bpf_map_lookup_elem(&host_addrs, &addr) != NULL;
}

static __always_inline int port_listed(__u32 port)
{
	__u8 *listed = bpf_map_lookup_elem(&allowed_ports, &port);

	return listed && *listed;
}

static __always_inline int port_allowed(const struct sock_key *key)
{
	return !ports_only || port_listed(key->local_port) || port_listed(key->remote_port);
}

/* Why the socket's file keeps it out of the map now (REASON_NONE: it does not). */
static __always_inline __u32 file_unsafe(struct sock *sk)
{
	struct file *file = BPF_CORE_READ(sk, sk_socket, file);

	if (!file)
		return REASON_NO_FILE;
	if (!(BPF_CORE_READ(file, f_flags) & O_NONBLOCK) && !allow_blocking)
		return REASON_BLOCKING;
	if (BPF_CORE_READ(sk, sk_rcvlowat) > 1)
		return REASON_RCVLOWAT;
	return REASON_NONE;
}

/* Why this socket's owner would notice tcp_bpf's receive path now; REASON_NONE when it would
 * not. Read live on every check: a program may change its socket at any time. */
static __always_inline __u32 reader_unsafe(struct sock *sk, const struct sock_info *info)
{
	return info->spliced ? REASON_SPLICED : file_unsafe(sk);
}

/* A field of a socket nothing here holds a reference on (sk_msg's peer): read directly
 * (`direct`, a constant: each program keeps one way) or by probe read. */
#define PEER_READ(direct, type, ptr, field)                                                         \
	((direct) ? ((type *)bpf_rdonly_cast((ptr), bpf_core_type_id_kernel(type)))->field          \
		  : BPF_CORE_READ((type *)(ptr), field))

/* Whether the owner has read anything from the socket (by recv or read: a splice would have
 * marked it spliced first, in the tracepoint that runs before the syscall). */
static __always_inline int has_read(void *tp, const int direct)
{
	__u64 received = PEER_READ(direct, struct tcp_sock, tp, bytes_received);
	__u32 unread = PEER_READ(direct, struct tcp_sock, tp, rcv_nxt) - PEER_READ(direct, struct tcp_sock, tp, copied_seq);

	return received > unread;
}

/* The inode of the socket's file (0 before accept() gave it one). */
static __always_inline __u64 inode_of(struct sock *sk)
{
	struct socket *sock = BPF_CORE_READ(sk, sk_socket);
	struct socket_alloc *alloc;

	if (!sock)
		return 0;
	alloc = (struct socket_alloc *)((char *)sock - bpf_core_field_offset(struct socket_alloc, socket));
	return BPF_CORE_READ(alloc, vfs_inode.i_ino);
}

/* Whether redirected data waits in the socket's psock for its reader. (A redirect still on its
 * way is covered by LEAVE_GRACE_NS; the psock's reference count would not tell it from a reader
 * blocked in recv().) */
static __always_inline int psock_busy(struct sock *sk)
{
	__u64 user_data = (__u64)BPF_CORE_READ(sk, sk_user_data) & SK_USER_DATA_PTRMASK;
	struct sk_psock *psock = (struct sk_psock *)user_data;
	struct list_head *head;

	if (!psock)
		return 0;
	head = (struct list_head *)((char *)psock + bpf_core_field_offset(struct sk_psock, ingress_msg));
	return BPF_CORE_READ(psock, ingress_msg.next) != head;
}

/* counts[reason]++, with the bound check the verifier can follow */
static __always_inline int count_reason(__u64 *counts, __u32 reason)
{
	asm volatile("" : "+r"(reason)); /* keep the check on the value that indexes */
	if (reason >= REASON_MAX)
		return 0;
	counts[reason]++;
	return 1;
}

/* Whether this is the first time the socket is kept plain for `reason`. Programs on two CPUs
 * may judge one socket at once (a splice marking it while the sweep or the tc program looks at
 * it): the bit is set atomically, so that only one of them counts it. */
static __always_inline int first_time(struct sock_info *info, __u32 reason)
{
	__u64 bit = 1ULL << (reason & 63);

	return !(info->reasons_seen & bit) && !(__sync_fetch_and_or(&info->reasons_seen, bit) & bit);
}

static __always_inline void set_state(struct sock_info *info, enum sock_state state, enum plain_reason reason,
				      struct bypass_counters *cnt)
{
	if (info->state != state)
		info->since_ns = bpf_ktime_get_ns();
	info->state = state;
	info->reason = reason;
	if (reason > REASON_NONE && first_time(info, reason))
		count_reason(cnt->plain_by_reason, reason);
}

/* Whether the socket was made by a process of the cgroup or of one below it. */
static __always_inline int in_cgroup(struct sock *sk, __u64 cgroup_id)
{
	struct cgroup *cgrp = BPF_CORE_READ(sk, sk_cgrp_data.cgroup);

	for (int level = 0; level < 32 && cgrp; level++) {
		if (BPF_CORE_READ(cgrp, kn, id) == cgroup_id)
			return 1;
		cgrp = (struct cgroup *)((char *)BPF_CORE_READ(cgrp, self.parent) -
					 bpf_core_field_offset(struct cgroup, self));
	}
	return 0;
}

/* The port of the connection's server end: ours when the cgroup listens on it. */
static __always_inline __u16 service_of(const struct sock_key *key)
{
	__u32 port = key->local_port;

	return bpf_map_lookup_elem(&listeners, &port) ? key->local_port : key->remote_port;
}

/* An entry a full map refused, counted by map (cnt->map_full.MAP): status names the map. */
#define COUNT_FULL(cnt, map)              \
	do {                              \
		if (cnt)                  \
			(cnt)->map_full.map++; \
	} while (0)

/* The socket's cookie where one was made (sockops makes one for each connection of the
 * cgroup; the sweep for those that established before the attach), 0 where not yet. */
static __always_inline __u64 cookie_of(struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
}

/* Whether an entry's socket is still open: it still has the entry's cookie (the memory of a
 * freed socket may hold another socket by now) and is not closed. */
static __always_inline int alive(const struct sock_info *info)
{
	struct sock *sk = (struct sock *)info->sk;

	return cookie_of(sk) == info->cookie && BPF_CORE_READ(sk, __sk_common.skc_state) != TCP_CLOSE;
}

/* Index the socket's tuple in its namespace. The index may still name a socket that closed with
 * the same tuple (its entry goes within an agent round): that one is replaced. A live one never
 * is: within one namespace no two live sockets have one tuple. */
static __always_inline void index_tuple(const struct sock_key *key, __u64 cookie, struct bypass_counters *cnt)
{
	struct sock_info *holder;
	__u64 *indexed;
	long err;

	err = bpf_map_update_elem(&sock_tuples, key, &cookie, BPF_NOEXIST);
	if (err == -EEXIST) {
		indexed = bpf_map_lookup_elem(&sock_tuples, key);
		if (!indexed || *indexed == cookie)
			return;
		holder = bpf_map_lookup_elem(&sock_info, indexed);
		if (holder && alive(holder))
			return;
		err = bpf_map_update_elem(&sock_tuples, key, &cookie, BPF_ANY);
	}
	if (err)
		COUNT_FULL(cnt, sock_tuples);
}

/* The socket's entry, made now if it has none (none can be made before it has a cookie). Two
 * programs on two CPUs may meet a new socket at once: the first makes the entry and the other
 * takes that one. `made` says whether this call made it. */
static __always_inline struct sock_info *new_info(struct sock *sk, __u64 cookie, const struct sock_key *key,
					       __u64 round, struct bypass_counters *cnt, int *made)
{
	struct sock_info info = {}, *entry;
	__u32 service = service_of(key);
	long err;

	*made = 0;
	if (!cookie)
		return NULL;
	info.sk = (__u64)sk;
	info.cookie = cookie;
	info.key = *key;
	info.since_ns = bpf_ktime_get_ns();
	info.seen_round = info.first_round = round;
	info.state = STATE_WAITING;
	info.service_port = service;
	info.spliced = bpf_map_lookup_elem(&spliced_services, &service) != NULL;
	err = bpf_map_update_elem(&sock_info, &cookie, &info, BPF_NOEXIST);
	if (err && err != -EEXIST) {
		COUNT_FULL(cnt, sock_info);
		return NULL;
	}
	entry = bpf_map_lookup_elem(&sock_info, &cookie);
	if (!entry || err)
		return entry;
	*made = 1;
	set_state(entry, STATE_WAITING, entry->spliced ? REASON_SPLICED : REASON_NONE, cnt);
	return entry;
}

/* Established sockets the bypass may take: IPv4/IPv6 with a local peer (scope) on an allowed port. */
static __always_inline int in_reach(struct sock_key *key)
{
	return (key->family == AF_INET || key->family == AF_INET6) && in_scope(key) && port_allowed(key);
}

/* new_info() for a candidate of this round, counted as one when this call made its entry. */
static __always_inline struct sock_info *candidate(struct sock *sk, __u64 cookie, const struct sock_key *key,
						struct bypass_control *ctl, struct bypass_counters *cnt)
{
	struct sock_info *info;
	int made;

	info = new_info(sk, cookie, key, ctl->round, cnt, &made);
	cnt->candidates += made;
	return info;
}

/* The entry of an established socket of the cgroup, made when it has none; NULL when the socket
 * is not one the bypass takes. `key` gets its tuple. */
static __always_inline struct sock_info *entry_of(struct sock *sk, __u64 cookie, struct sock_key *key,
					       struct bypass_control *ctl, struct bypass_counters *cnt)
{
	struct sock_info *info;

	key_of_sock(sk, key);
	if (!in_reach(key))
		return NULL;
	info = cookie ? bpf_map_lookup_elem(&sock_info, &cookie) : NULL;
	if (info)
		return info;
	if (BPF_CORE_READ(sk, __sk_common.skc_state) != TCP_ESTABLISHED || ctl->detaching)
		return NULL;
	return candidate(sk, cookie, key, ctl, cnt);
}

/* Why the socket may not be in the map now (REASON_NONE: it may). */
static __always_inline __u32 why_plain(struct sock *sk, struct sock_info *info)
{
	if (!info->inode)
		info->inode = inode_of(sk);
	return reader_unsafe(sk, info);
}

/* --- the proof: each end records its peer once, and only the one the kernel delivers to --- */

/* Each end records the other's cookie when a proof names it; both must name each other. A
 * socket that names another peer already keeps it: the new claim is a conflict, counted once,
 * and an end that had named none trusts nobody from then on. Returns whether the two are
 * each other's peers now. */
static __always_inline int pair_up(struct sock_info *a, struct sock_info *b, struct bypass_counters *cnt)
{
	__u64 was_a, was_b;

	if (a->peer == b->cookie && b->peer == a->cookie)
		return 1;
	if (a->peer == PEER_CONFLICT || b->peer == PEER_CONFLICT)
		return 0;
	was_a = __sync_val_compare_and_swap(&a->peer, 0, b->cookie);
	was_b = __sync_val_compare_and_swap(&b->peer, 0, a->cookie);
	if ((!was_a || was_a == b->cookie) && (!was_b || was_b == a->cookie))
		return 1;
	if (!was_a)
		a->peer = PEER_CONFLICT;
	if (!was_b)
		b->peer = PEER_CONFLICT;
	cnt->conflicts++;
	return 0;
}

/* The socket's proven peer: the one its entry names (once that one names it back), or, where
 * no proof has named one yet, the one live socket of its own namespace whose tuple mirrors its
 * own (sock_tuples). A socket in another namespace is never found this way: there a tuple proves
 * nothing (the handshake's nonce does, in sockops). */
static __always_inline struct sock_info *proven_peer(struct sock_info *info, struct bypass_counters *cnt)
{
	struct sock_key peer_key = {};
	struct sock_info *peer;
	__u64 peer_cookie = info->peer, *indexed;

	if (peer_cookie == PEER_CONFLICT)
		return NULL;
	if (peer_cookie) {
		peer = bpf_map_lookup_elem(&sock_info, &peer_cookie);
	} else {
		peer_of(&info->key, &peer_key);
		indexed = bpf_map_lookup_elem(&sock_tuples, &peer_key);
		if (!indexed)
			return NULL;
		peer_cookie = *indexed;
		peer = bpf_map_lookup_elem(&sock_info, &peer_cookie);
		if (peer && !alive(peer))
			return NULL; /* a closed socket the index still names: the live one comes later */
	}
	if (!peer || !pair_up(info, peer, cnt))
		return NULL;
	return peer;
}

/* Into the sockhash under the socket's cookie; `sock` is the socket as the verifier lets it be
 * inserted. The tc program (on each CPU, for segments either way) and the sweep may meet the
 * same socket at once, and the kernel refuses a second insert of a socket already in the map
 * with EBUSY, as if another map's program held it (sock_map_link): so the one that sets the
 * entry's `inserting` first inserts, and the others leave the socket and its state to it. */
static __always_inline int insert(void *sock, struct sock_info *info, struct bypass_counters *cnt)
{
	__u64 cookie = info->cookie;
	long err;

	if (__sync_lock_test_and_set(&info->inserting, 1))
		return 0;
	err = bpf_map_update_elem(&sock_map, &cookie, sock, BPF_NOEXIST);
	if (err && err != -EEXIST) {
		set_state(info, STATE_LEFT, REASON_INSERT_FAILED, cnt);
		cnt->insert_failed++;
		return 0;
	}
	set_state(info, STATE_JOINED, REASON_NONE, cnt);
	cnt->sockets_inserted += !err; /* EEXIST: in already under its own cookie, its entry made anew */
	return !err;
}

/* A note in a small map whose loss costs only a chance to join (a listener not told apart, a
 * namespace the sweep does not walk, a spliced service whose next connections start joinable:
 * each of their sockets is still judged on its own); counted by map when it is full. */
static __always_inline int note(void *map, void *key, void *value)
{
	return bpf_map_update_elem(map, key, value, BPF_ANY) == 0;
}

static __always_inline void note_listener(__u32 port)
{
	struct bypass_control *ctl = control_here();

	struct bypass_counters *cnt = counters_here();

	if (ctl && !note(&listeners, &port, &ctl->round))
		COUNT_FULL(cnt, listeners);
}

static __always_inline void count_port(__u32 port, int established)
{
	__u32 *count = bpf_map_lookup_elem(&cgroup_ports, &port);

	if (!count)
		return;
	if (established)
		__sync_fetch_and_add(count, 1);
	else if (*count) /* one counted by an earlier bypass, whose map is gone: nothing to undo */
		__sync_fetch_and_add(count, -1);
}

/* --- the handshake's nonce: pairs between namespaces --- */

/* What rides in the TCP option: kind, length, ExID, the nonce (12 bytes, no padding). */
struct nonce_option {
	__u8 kind;
	__u8 len;
	__u8 exid[2];
	__u8 nonce[8];
};

/* Whether a socket's peer may live in another namespace (`key` gets its tuple): loopback peers
 * never do (and the kernel's lookup proves them); other addresses may (pods over a veth pair, a
 * translated address). */
static __always_inline int may_cross_namespaces(struct sock *sk, struct sock_key *key, struct bypass_control *ctl)
{
	key_of_sock(sk, key);
	return in_reach(key) && !is_loopback(key) && !ctl->detaching;
}

/* A nonce only this socket can have sent: SipHash of its cookie (never reused) under nonce_key,
 * which only the tool knows. */
static __always_inline __u64 nonce_of(__u64 cookie, __u32 netns)
{
	__u64 nonce = siphash_2u64(cookie, netns, nonce_key[0], nonce_key[1]);

	return nonce ? nonce : 1;
}

/* The nonce option of the segment at hand (skops->skb), or 0. */
static __always_inline __u64 nonce_received(struct bpf_sock_ops *skops)
{
	struct nonce_option opt = { .kind = TCPOPT_EXP, .len = 4, .exid = { NONCE_EXID_0, NONCE_EXID_1 } };
	__u64 nonce;

	if (bpf_load_hdr_opt(skops, &opt, sizeof(opt), 0) != sizeof(opt))
		return 0;
	__builtin_memcpy(&nonce, opt.nonce, sizeof(nonce));
	return nonce;
}

/* The active end of such a connection, established: its entry and its nonce, recorded for its
 * passive end to claim. Returns the callback flags that have the kernel ask for the option on
 * its next segments and show it the segments that carry an option it does not know (the
 * passive end's answer). */
static __always_inline __u32 offer_nonce(struct sock *sk, __u64 cookie, struct bypass_control *ctl,
					 struct bypass_counters *cnt)
{
	struct handshake hs = { .active = cookie };
	struct sock_key key = {};
	struct sock_info *info;
	__u64 nonce;

	info = may_cross_namespaces(sk, &key, ctl) ? candidate(sk, cookie, &key, ctl, cnt) : NULL;
	if (!info)
		return 0;
	nonce = nonce_of(cookie, key.netns);
	if (bpf_map_update_elem(&handshakes, &nonce, &hs, BPF_NOEXIST)) {
		COUNT_FULL(cnt, handshakes);
		return 0;
	}
	info->nonce = info->handshake = nonce;
	return BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG;
}

/* The passive end, established by a segment that carries an active end's nonce: only the
 * socket the kernel delivered that segment to has it. It claims the nonce and answers with one
 * of its own (the flag returned has the kernel ask for it on its next segments); the pair is
 * proven once the active end receives that answer (confirm_nonce), which only the socket the
 * kernel delivers this one's segments to can. A nonce that a second socket receives (a copy of
 * the segment that reached another namespace, a replay) proves nothing: neither is trusted,
 * nor the active end, unless its pair has joined already. */
static __always_inline __u32 claim_nonce(struct bpf_sock_ops *skops, struct sock *sk, __u64 cookie,
					 struct bypass_control *ctl, struct bypass_counters *cnt)
{
	struct sock_info *mine, *active, *first;
	struct sock_key key = {};
	struct handshake *hs;
	__u64 nonce;

	if (!may_cross_namespaces(sk, &key, ctl))
		return 0;
	nonce = nonce_received(skops);
	hs = nonce ? bpf_map_lookup_elem(&handshakes, &nonce) : NULL;
	if (!hs)
		return 0; /* none: its active end is not one of the cgroup's, or that one is gone */
	mine = candidate(sk, cookie, &key, ctl, cnt);
	if (!mine)
		return 0;
	mine->handshake = nonce;
	if (__sync_fetch_and_add(&hs->claims, 1)) {
		mine->peer = PEER_CONFLICT;
		set_state(mine, STATE_WAITING, REASON_CONFLICT, cnt);
		active = bpf_map_lookup_elem(&sock_info, &hs->active);
		first = bpf_map_lookup_elem(&sock_info, &hs->passive);
		if (active && !active->inserting) {
			__sync_val_compare_and_swap(&active->peer, hs->passive, PEER_CONFLICT);
			if (first)
				__sync_val_compare_and_swap(&first->peer, hs->active, PEER_CONFLICT);
		}
		cnt->conflicts++;
		return 0;
	}
	mine->nonce = nonce_of(cookie, key.netns);
	hs->passive_nonce = mine->nonce;
	hs->passive = cookie;
	return BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
}

/* The active end receives a segment with an option the kernel does not know: where it is the
 * answer its passive end gave (and nobody else claimed its nonce), the two are each other's
 * peers. The kernel shows it segments only once they passed its sequence checks. */
static __always_inline void confirm_nonce(struct bpf_sock_ops *skops, struct bypass_counters *cnt)
{
	__u64 cookie = bpf_get_socket_cookie(skops), answer = nonce_received(skops);
	struct sock_info *info, *passive;
	struct handshake *hs;

	if (!answer)
		return; /* another option it does not know */
	info = bpf_map_lookup_elem(&sock_info, &cookie);
	hs = info && info->handshake ? bpf_map_lookup_elem(&handshakes, &info->handshake) : NULL;
	if (!hs || hs->active != cookie || answer != hs->passive_nonce)
		return; /* not the answer to its nonce */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG);
	if (hs->claims != 1) {
		__sync_val_compare_and_swap(&info->peer, 0, PEER_CONFLICT);
		return;
	}
	passive = bpf_map_lookup_elem(&sock_info, &hs->passive);
	if (passive && pair_up(info, passive, cnt))
		cnt->paired_by_handshake++;
}

/* The entry of a socket while its nonce is still due on a segment (NONCE_SEGMENTS); once it has
 * gone out often enough, the kernel stops asking for it. */
static __always_inline struct sock_info *nonce_due(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct sock_info *info = bpf_map_lookup_elem(&sock_info, &cookie);

	if (!info || !info->nonce)
		return NULL; /* another program asked for header options on this socket */
	if (info->nonce_segments < NONCE_SEGMENTS)
		return info;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
	return NULL;
}

static __always_inline void write_nonce(struct bpf_sock_ops *skops)
{
	struct nonce_option opt = { .kind = TCPOPT_EXP, .len = sizeof(opt), .exid = { NONCE_EXID_0, NONCE_EXID_1 } };
	struct sock_info *info = nonce_due(skops);

	if (!info)
		return;
	__builtin_memcpy(opt.nonce, &info->nonce, sizeof(opt.nonce));
	if (!bpf_store_hdr_opt(skops, &opt, sizeof(opt), 0))
		info->nonce_segments++;
}

SEC("sockops")
int bypass_sockops(struct bpf_sock_ops *skops)
{
	struct bypass_counters *cnt = counters_here();
	struct bypass_control *ctl = control_here();
	struct bpf_sock *sk = skops->sk;
	__u32 netns, flags;
	struct tcp_sock *tp;
	__u64 cookie;

	if (!cnt || !ctl)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		cnt->established++;
		cookie = bpf_get_socket_cookie(skops); /* made now: the tc program can join it */
		count_port(skops->local_port, 1);
		/* and counted out again when it closes (BPF_SOCK_OPS_STATE_CB) */
		flags = skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG;
		tp = sk ? bpf_skc_to_tcp_sock(sk) : NULL;
		if (tp) {
			netns = netns_of((struct sock *)tp);
			if (!note(&netns_seen, &netns, &ctl->round))
				COUNT_FULL(cnt, netns_seen);
			if (!bpf_map_lookup_elem(&event_netns, &netns))
				cnt->established_for_sweep++;
			if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
				flags |= offer_nonce((struct sock *)tp, cookie, ctl, cnt);
			else
				flags |= claim_nonce(skops, (struct sock *)tp, cookie, ctl, cnt);
		}
		bpf_sock_ops_cb_flags_set(skops, flags);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		if (nonce_due(skops))
			bpf_reserve_hdr_opt(skops, sizeof(struct nonce_option), 0);
		break;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
		write_nonce(skops);
		break;
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		confirm_nonce(skops, cnt);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB: /* before any connection to it: tells server ends apart */
		note_listener(skops->local_port);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			count_port(skops->local_port, 0);
		break;
	}
	return 1;
}

/* --- joining on the first segment: tc on lo's ingress --- */

/* The tuple of a TCP segment as bpf_sk_lookup_tcp() takes it (finding its receiver), and its
 * size; 0 for anything else. */
static __always_inline __u32 tuple_of(struct __sk_buff *skb, struct bpf_sock_tuple *tuple)
{
	__u8 proto;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 vihl;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, protocol), &proto, 1) ||
		    proto != IPPROTO_TCP ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, saddr), &tuple->ipv4.saddr, 8) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + (vihl & 0xf) * 4, &tuple->ipv4.sport, 4))
			return 0;
		return sizeof(tuple->ipv4);
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, nexthdr), &proto, 1) ||
		    proto != IPPROTO_TCP || /* extension headers: not on loopback TCP */
		    bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, saddr), &tuple->ipv6.saddr, 32) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(struct ipv6hdr), &tuple->ipv6.sport, 4))
			return 0;
		return sizeof(tuple->ipv6);
	}
	return 0;
}

/* Whether the segment may be one of the cgroup's: its receiving port is one a connection of
 * the cgroup has (cgroup_ports). Read straight from the packet, before anything costs a helper
 * call; a packet whose headers are not where this looks is left to the full check. */
static __always_inline int maybe_ours(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	struct tcphdr *tcp;
	__u32 port, *count;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if ((void *)(ip + 1) > end)
			return 1;
		if (ip->protocol != IPPROTO_TCP)
			return 0;
		tcp = (void *)ip + (ip->ihl & 0xf) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if ((void *)(ip6 + 1) > end)
			return 1;
		if (ip6->nexthdr != IPPROTO_TCP)
			return 0;
		tcp = (void *)(ip6 + 1);
	} else {
		return 0;
	}
	if ((void *)(tcp + 1) > end)
		return 1;
	port = bpf_ntohs(tcp->dest);
	count = bpf_map_lookup_elem(&cgroup_ports, &port);
	return count && *count;
}

/* The same connection seen from the sender: finds the sender. */
static __always_inline void reverse(struct bpf_sock_tuple *tuple, __u32 size)
{
	if (size == sizeof(tuple->ipv4)) {
		__u32 addr = tuple->ipv4.saddr;
		__u16 port = tuple->ipv4.sport;

		tuple->ipv4.saddr = tuple->ipv4.daddr;
		tuple->ipv4.daddr = addr;
		tuple->ipv4.sport = tuple->ipv4.dport;
		tuple->ipv4.dport = port;
	} else {
		__u32 addr[4];
		__u16 port = tuple->ipv6.sport;

		__builtin_memcpy(addr, tuple->ipv6.saddr, sizeof(addr));
		__builtin_memcpy(tuple->ipv6.saddr, tuple->ipv6.daddr, sizeof(addr));
		__builtin_memcpy(tuple->ipv6.daddr, addr, sizeof(addr));
		tuple->ipv6.sport = tuple->ipv6.dport;
		tuple->ipv6.dport = port;
	}
}

/* What the tc program knows of one end of a pair: its entry, when it has one, and why it may
 * not join now. */
struct end {
	struct sock_key key;
	struct sock_info *info;
	__u64 cookie;
	__u32 why;
};

static __always_inline void judge_end(struct sock *sk, struct end *end)
{
	key_of_sock(sk, &end->key);
	end->cookie = cookie_of(sk);
	end->info = end->cookie ? bpf_map_lookup_elem(&sock_info, &end->cookie) : NULL;
	if (end->info && end->info->state == STATE_JOINED)
		end->why = REASON_NONE;
	else
		end->why = end->info ? why_plain(sk, end->info) : file_unsafe(sk);
}

/* An end that cannot join yet, or whose peer cannot, keeps waiting (where it has an entry: the
 * tc program makes entries only for pairs it joins, so that a connection that never qualifies
 * costs it no map update). */
static __always_inline void keep_waiting(struct end *end, __u32 peer_why, struct bypass_counters *cnt)
{
	struct sock_info *info = end->info;

	if (!info || info->state == STATE_JOINED)
		return;
	if (end->why != REASON_NONE)
		set_state(info, STATE_WAITING, end->why, cnt);
	else if (peer_why != REASON_NONE)
		set_state(info, STATE_READY, REASON_PEER_WAITING, cnt);
}

/* Both ends of a loopback connection, found on a segment between them: join both once both
 * qualify. `receiver` and `sender` are the sockets bpf_sk_lookup_tcp() returned in the namespace
 * the segment travels in (the proof that they are each other's peers), `rsk` the receiver as a
 * struct sock (one of the cgroup's). */
static __always_inline void join_pair(struct bpf_sock *receiver, struct sock *rsk, struct bpf_sock *sender,
				      struct bypass_control *ctl, struct bypass_counters *cnt)
{
	struct sock *ssk = (struct sock *)bpf_skc_to_tcp_sock(sender);
	struct end r = {}, s = {};

	if (!ssk)
		return;
	judge_end(rsk, &r);
	if (!in_reach(&r.key))
		return;
	if (!in_cgroup(ssk, cgroup_id)) {
		if (r.info && (r.info->state == STATE_WAITING || r.info->state == STATE_READY))
			set_state(r.info, STATE_WAITING, REASON_PEER_OUTSIDE, cnt);
		return;
	}
	judge_end(ssk, &s);
	if (r.why == REASON_NONE && s.why == REASON_NONE) {
		if (!r.info)
			r.info = entry_of(rsk, r.cookie, &r.key, ctl, cnt);
		if (!s.info)
			s.info = entry_of(ssk, s.cookie, &s.key, ctl, cnt);
		if (!r.info || !s.info)
			return;
		if (!pair_up(r.info, s.info, cnt)) {
			r.why = s.why = REASON_CONFLICT;
		} else {
			r.why = why_plain(rsk, r.info); /* with its entry: spliced, or its service was */
			s.why = why_plain(ssk, s.info);
		}
	}
	if ((r.info && r.info->state > STATE_JOINED) || (s.info && s.info->state > STATE_JOINED))
		return; /* leaving or left: for good */
	if (r.why != REASON_NONE || s.why != REASON_NONE) {
		keep_waiting(&r, s.why, cnt);
		keep_waiting(&s, r.why, cnt);
		return;
	}
	if (r.info->state != STATE_JOINED && insert(receiver, r.info, cnt))
		cnt->inserted_by_event++;
	if (s.info->state != STATE_JOINED && insert(sender, s.info, cnt))
		cnt->inserted_by_event++;
}

SEC("tc")
int bypass_join_tc(struct __sk_buff *skb)
{
	struct bypass_counters *cnt = counters_here();
	struct bypass_control *ctl = control_here();
	struct bpf_sock *receiver, *sender;
	struct bpf_sock_tuple tuple = {};
	struct tcp_sock *tp;
	__u32 size;

	if (!maybe_ours(skb) || !cnt || !ctl || stopped(ctl))
		return TC_ACT_UNSPEC;
	size = tuple_of(skb, &tuple);
	if (!size)
		return TC_ACT_UNSPEC;
	receiver = bpf_sk_lookup_tcp(skb, &tuple, size, CURRENT_NETNS, 0);
	if (!receiver)
		return TC_ACT_UNSPEC;
	tp = receiver->state == TCP_ESTABLISHED ? bpf_skc_to_tcp_sock(receiver) : NULL;
	if (tp && in_cgroup((struct sock *)tp, cgroup_id)) {
		reverse(&tuple, size);
		sender = bpf_sk_lookup_tcp(skb, &tuple, size, CURRENT_NETNS, 0);
		if (sender) {
			if (sender->state == TCP_ESTABLISHED)
				join_pair(receiver, (struct sock *)tp, sender, ctl, cnt);
			bpf_sk_release(sender);
		}
	}
	bpf_sk_release(receiver);
	return TC_ACT_UNSPEC;
}

/* --- the sweep: run by the agent; the socket is not locked here (the sockhash update and
 * delete take its lock themselves) --- */

/* Join a socket the sweep found: once it qualifies, its peer is proven (proven_peer) and
 * qualifies too (the peer waits READY until the sweep meets this end). Where the tc program
 * joins (event_netns) it has usually done so already, at the first segment after both
 * qualified; the sweep takes the pairs that sent nothing since. */
static __always_inline void try_join(struct sock *sk, void *sock, struct sock_info *info,
				     struct bypass_counters *cnt, __u64 round)
{
	struct sock_info *peer = proven_peer(info, cnt);
	__u32 reason;

	if (!peer) {
		if (info->peer == PEER_CONFLICT)
			set_state(info, STATE_WAITING, REASON_CONFLICT, cnt);
		else if (round > info->first_round)
			/* the peer may just come later in this round: outside only if missing a round later */
			set_state(info, STATE_WAITING, REASON_PEER_OUTSIDE, cnt);
		return;
	}
	reason = why_plain(sk, info);
	if (reason != REASON_NONE) {
		set_state(info, STATE_WAITING, reason, cnt);
		return;
	}
	if (peer->state != STATE_READY && peer->state != STATE_JOINED) {
		set_state(info, STATE_READY, REASON_PEER_WAITING, cnt);
		return;
	}
	insert(sock, info, cnt);
}

/* Both ends or neither: a socket whose peer's insert failed after this one joined leaves too. */
static __always_inline int peer_failed_to_join(const struct sock_info *info)
{
	__u64 peer_cookie = info->peer;
	struct sock_info *peer;

	if (!peer_cookie || peer_cookie == PEER_CONFLICT)
		return 0;
	peer = bpf_map_lookup_elem(&sock_info, &peer_cookie);
	return peer && peer->state == STATE_LEFT && peer->reason == REASON_INSERT_FAILED;
}

/* A joined socket that turned unsafe, or all of them on detach: stop redirecting into it at
 * once (sk_msg redirects only into JOINED peers), and take it out of the map only when its
 * reader has taken everything redirected to it. Leaving the map drops what is still queued. */
static __always_inline void leave_when_drained(struct sock *sk, struct sock_info *info, struct bypass_counters *cnt)
{
	__u32 reason = detaching() ? REASON_DETACH : reader_unsafe(sk, info);
	__u64 cookie = info->cookie;

	if (reason == REASON_NONE && peer_failed_to_join(info))
		reason = REASON_INSERT_FAILED;
	if (info->state == STATE_JOINED) {
		if (reason != REASON_NONE)
			set_state(info, STATE_LEAVING, reason, cnt);
		return;
	}
	if (psock_busy(sk)) {
		info->since_ns = bpf_ktime_get_ns();
		return;
	}
	if (bpf_ktime_get_ns() - info->since_ns < LEAVE_GRACE_NS)
		return;
	if (bpf_map_delete_elem(&sock_map, &cookie))
		return; /* not there (any more): the socket is closing, and its entry goes with it */
	cnt->sockets_left++;
	count_reason(cnt->left_by_reason, info->reason);
	set_state(info, STATE_LEFT, info->reason, cnt);
}

/* One socket the sweep found: `tp` is the socket as the verifier lets it be inserted. */
static __always_inline void visit(struct tcp_sock *tp)
{
	struct bypass_counters *cnt = counters_here();
	struct bypass_control *ctl = control_here();
	struct sock *sk = (struct sock *)tp;
	struct sock_key key = {};
	struct sock_info *info;
	__u64 cookie;
	int state;

	if (!cnt || !ctl || !in_cgroup(sk, cgroup_id))
		return;
	state = BPF_CORE_READ(sk, __sk_common.skc_state);
	if (state == TCP_LISTEN) {
		note_listener(BPF_CORE_READ(sk, __sk_common.skc_num));
		return;
	}
	cookie = bpf_get_socket_cookie(tp);
	info = entry_of(sk, cookie, &key, ctl, cnt);
	if (!info)
		return;
	if (!info->indexed && !info->peer) { /* where its peer, in this namespace, finds it */
		index_tuple(&key, cookie, cnt);
		info->indexed = 1;
	}
	info->seen_round = ctl->round;

	switch (info->state) {
	case STATE_WAITING:
	case STATE_READY:
		if (ctl->detaching)
			set_state(info, STATE_LEFT, REASON_DETACH, cnt);
		else if (state == TCP_ESTABLISHED)
			try_join(sk, tp, info, cnt, ctl->round);
		break;
	case STATE_JOINED:
	case STATE_LEAVING:
		leave_when_drained(sk, info, cnt);
		break;
	case STATE_LEFT: /* plain TCP for the rest of its life */
		break;
	}
}

/* Every open file of every process, whatever its network namespace. */
SEC("iter/task_file")
int bypass_sweep_files(struct bpf_iter__task_file *ctx)
{
	struct file *file = ctx->file;
	struct socket *sock;
	struct tcp_sock *tp;

	if (!file || !ctx->task)
		return 0;
	sock = bpf_sock_from_file(file);
	if (!sock || !sock->sk)
		return 0;
	tp = bpf_skc_to_tcp_sock(sock->sk);
	if (tp)
		visit(tp);
	return 0;
}

/* Every TCP socket of the network namespace the agent made the iterator in. */
SEC("iter/tcp")
int bypass_sweep_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct tcp_sock *tp;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (tp)
		visit(tp);
	return 0;
}

/* --- splice and sendfile readers --- */

/* The TCP socket behind file descriptor fd of the current task, or NULL. */
static __always_inline struct sock *tcp_sock_of_fd(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds, *file;
	struct socket *sock;
	struct sock *sk;

	if (fd < 0 || !fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	/* a socket's file points at its struct socket, which points back at the file */
	if (!sock || BPF_CORE_READ(sock, file) != file)
		return NULL;
	sk = BPF_CORE_READ(sock, sk);
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP || BPF_CORE_READ(sk, sk_type) != SOCK_STREAM)
		return NULL;
	return sk;
}

/* The owner reads this socket with splice (or sendfile): it must never receive a redirect, and
 * its service's later connections stay plain. A joined socket starts leaving at once; one not
 * met yet gets its entry here, so that it never joins. */
/* The owner reads this socket with splice (or sendfile): it must never receive a redirect, and
 * its service's later connections stay plain. A joined socket starts leaving at once; one not
 * met yet gets its entry here, so that it never joins (one with no cookie yet is not in the map,
 * and its service's mark keeps it out). */
static __always_inline void mark_spliced(struct sock *sk)
{
	struct bypass_counters *cnt = counters_here();
	struct bypass_control *ctl = control_here();
	struct sock_key key = {};
	struct sock_info *info;
	__u64 one = 1, cookie;
	__u32 service;
	int made;

	if (!sk || !cnt || !ctl || !in_cgroup(sk, cgroup_id))
		return;
	key_of_sock(sk, &key);
	cookie = cookie_of(sk);
	info = cookie ? bpf_map_lookup_elem(&sock_info, &cookie) : NULL;
	if (!info && in_reach(&key))
		info = new_info(sk, cookie, &key, ctl->round, cnt, &made);
	if (info && info->spliced)
		return;
	service = info ? info->service_port : service_of(&key);
	if (!note(&spliced_services, &service, &one))
		COUNT_FULL(cnt, spliced_services);
	if (!info)
		return;
	info->spliced = 1;
	if (info->state == STATE_WAITING || info->state == STATE_READY)
		set_state(info, STATE_WAITING, REASON_SPLICED, cnt);
	else if (info->state == STATE_JOINED) /* nothing more goes in; the sweep takes it out once drained */
		set_state(info, STATE_LEAVING, REASON_SPLICED, cnt);
	cnt->spliced++;
}

/* splice() and sendfile() from a TCP socket, and io_uring's splice, read it through
 * tcp_splice_read(): this runs before the read, and on nothing else. A syscall tracepoint
 * instead sends every syscall of every task on the host down the slow path (0.35-0.75 µs more
 * per plain 1 KiB round trip on the host: docs/bench-results.md). */
SEC("fentry/tcp_splice_read")
int BPF_PROG(bypass_splice_read, struct socket *sock)
{
	mark_spliced(sock->sk);
	return 0;
}

/* Where the kernel takes no fentry program: the two syscalls, at their entry. */
SEC("tracepoint/syscalls/sys_enter_splice")
int bypass_splice(struct trace_event_raw_sys_enter *ctx)
{
	mark_spliced(tcp_sock_of_fd((int)ctx->args[0])); /* fd_in */
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_sendfile64")
int bypass_sendfile(struct trace_event_raw_sys_enter *ctx)
{
	mark_spliced(tcp_sock_of_fd((int)ctx->args[1])); /* in_fd */
	return 0;
}

/* --- sk_msg: every send of a socket in the map --- */

/* The message takes the TCP way. Its bytes join the peer's TCP queue and our write_seq moves on:
 * the peer has to read them before anything is redirected again (`peer_ordered`), and its queue
 * is read again before the next redirect (`queue_budget`). */
static __always_inline int pass(struct bypass_counters *cnt, struct sock_info *self, __u64 *reason, __u32 size)
{
	if (self) {
		self->peer_ordered = 0;
		self->queue_budget = 0;
	}
	(*reason)++;
	cnt->passed_msgs++;
	cnt->passed_bytes += size;
	return SK_PASS;
}

/* Whether a peer whose queue would pass its limit gets a larger one. The redirect path has no
 * backpressure of its own, so a peer's queue is bounded by what TCP would let a writer have on
 * its way before it blocks: the writer's send buffer and the peer's receive buffer (at least
 * queue_floor). A reader that keeps reading earns more, as TCP's autotuning grows its window:
 * the limit doubles, up to the kernel's tcp_rmem maximum, each time the peer has read a whole
 * limit's worth since it last grew. One that stops (or never reads) stays where it is, and past
 * the limit sends take TCP, whose window stops the sender. */
static __always_inline int queue_grows(struct sock_info *info, struct sock *psk, struct sock *self, __u32 rmem,
				       __u32 size)
{
	__u32 limit = info->queue_limit, cap;
	__u64 consumed = info->redirected_bytes - rmem; /* rmem counts its unread TCP data too: a floor */

	if (!limit) {
		limit = NETBPF_MAX((__u32)BPF_CORE_READ(psk, sk_rcvbuf), queue_floor) + self->sk_sndbuf;
		info->queue_limit = limit;
		if (rmem + size <= limit)
			return 1;
	}
	cap = BPF_CORE_READ(psk, __sk_common.skc_net.net, ipv4.sysctl_tcp_rmem[2]);
	if (consumed - info->consumed_mark < limit || limit >= cap)
		return 0;
	limit = limit * 2 < cap ? limit * 2 : cap;
	info->queue_limit = limit;
	info->consumed_mark = consumed;
	return rmem + size <= limit;
}

/* Per message the program reads only what may have changed since the last one. A socket's own
 * entry keeps what its sends know of its peer, written only by this program under this socket's
 * lock (no atomics), and facts that only its own sends can undo are kept there instead of read
 * again:
 *   - `peer_ordered`: once the peer has read all we sent the TCP way (our write_seq == its
 *     copied_seq), that holds until we send the TCP way again (pass() clears it);
 *   - `queue_budget`: only our sends add to the peer's queue, so after reading its size once we
 *     may redirect up to its limit without reading it again (pass() clears it too: TCP bytes
 *     land in the queue later).
 * It redirects only to the peer its entry names, and only while that peer's entry names it
 * back: whatever another socket builds, it never becomes the destination. */
static __always_inline int redirect_msg(struct sk_msg_md *msg, const int direct)
{
	struct bypass_counters *cnt = counters_here();
	struct sock_info *info, *peer;
	struct tcp_sock *self;
	__u64 cookie, peer_cookie;
	struct sock *psk;
	__u32 size = msg->size;
	__u32 rmem;

	if (!cnt)
		return SK_PASS;
	if (!msg->sk)
		return pass(cnt, NULL, &cnt->passed_no_peer, size);
	/* A cast costs no helper call: on a kernel with return thunks (AMD's SRSO mitigation) each
	 * helper's return is a good part of what this program costs per message. */
	self = direct ? bpf_rdonly_cast(msg->sk, bpf_core_type_id_kernel(struct tcp_sock))
		      : bpf_skc_to_tcp_sock(msg->sk);
	if (!self)
		return pass(cnt, NULL, &cnt->passed_no_peer, size);
	cookie = self->inet_conn.icsk_inet.sk.__sk_common.skc_cookie.counter;
	info = bpf_map_lookup_elem(&sock_info, &cookie);
	if (!info)
		return pass(cnt, NULL, &cnt->passed_no_peer, size);
	peer_cookie = info->peer;
	peer = peer_cookie && peer_cookie != PEER_CONFLICT ? bpf_map_lookup_elem(&sock_info, &peer_cookie) : NULL;
	if (!peer || peer->peer != cookie)
		return pass(cnt, info, &cnt->passed_no_peer, size);
	if (sends_stopped())
		return pass(cnt, info, &cnt->passed_detaching, size);
	if (peer->state != STATE_JOINED)
		return pass(cnt, info, &cnt->passed_no_peer, size);
	/* The peer's entry holds no reference on its socket, and may outlive it until its close is
	 * seen. Following psk is still safe: every read through it is a probe read (BPF_CORE_READ,
	 * or a load through bpf_rdonly_cast, which the JIT guards), which cannot fault, and the
	 * redirect goes through the sockhash under the peer's cookie, which no other socket ever
	 * has: the sockhash holds a reference on each socket in it and drops a closed one before it
	 * is freed. A check may read garbage from a stale entry; the redirect then fails and the
	 * message goes the TCP way. */
	psk = (struct sock *)peer->sk;

	/* Nothing goes into a socket before its owner has read it: a first read by splice would
	 * never see it. The splice watch marks the socket before that read, so "has read" is
	 * looked at before "spliced". */
	if (!info->peer_reads) {
		if (!has_read(psk, direct))
			return pass(cnt, info, &cnt->passed_not_reading, size);
		info->peer_reads = 1;
	}
	asm volatile("" ::: "memory");
	/* The agent takes a peer that turned blocking out within a round; spliced and SO_RCVLOWAT
	 * peers must get nothing more from now on (splice never sees it; poll would report it). */
	if (peer->spliced || PEER_READ(direct, struct sock, psk, sk_rcvlowat) > 1)
		return pass(cnt, info, &cnt->passed_peer_unsafe, size);

	/* After shutdown(SHUT_WR) TCP fails the send with EPIPE, and the kernel's redirect would
	 * deliver it (past the end of the stream once the peer has read the FIN). */
	if (self->inet_conn.icsk_inet.sk.sk_shutdown & SEND_SHUTDOWN)
		return pass(cnt, info, &cnt->passed_shut_down, size);
	if (!info->peer_ordered) {
		if (self->write_seq != PEER_READ(direct, struct tcp_sock, psk, copied_seq))
			return pass(cnt, info, &cnt->passed_unread_plain, size);
		info->peer_ordered = 1;
	}

	if (size > info->queue_budget) {
		rmem = PEER_READ(direct, struct sock, psk, sk_backlog.rmem_alloc.counter);
		if (rmem + size > info->queue_limit &&
		    !queue_grows(info, psk, &self->inet_conn.icsk_inet.sk, rmem, size))
			return pass(cnt, info, &cnt->passed_peer_full, size);
		info->queue_budget = info->queue_limit - rmem; /* at least size: checked above */
	}

	/* On failure the helper leaves no redirect set, so SK_PASS sends the TCP way: never drop. */
	if (bpf_msg_redirect_hash(msg, &sock_map, &peer_cookie, BPF_F_INGRESS) != SK_PASS)
		return pass(cnt, info, &cnt->redirect_failed, size);
	info->queue_budget -= size;
	info->redirected_bytes += size;
	cnt->redirected_msgs++;
	cnt->redirected_bytes += size;
	return SK_PASS;
}

SEC("sk_msg")
int bypass_sk_msg(struct sk_msg_md *msg)
{
	return redirect_msg(msg, 1);
}

SEC("sk_msg")
int bypass_msg_read(struct sk_msg_md *msg)
{
	return redirect_msg(msg, 0);
}

char LICENSE[] SEC("license") = "GPL";
