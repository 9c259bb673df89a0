/* bypass: the structs both sides read. Python decodes them from the object's BTF. */
#ifndef BYPASS_H
#define BYPASS_H

/* One end of a TCP connection, seen from that end. IPv4 (and IPv4-mapped IPv6) addresses are
 * family AF_INET in ip[0]; ports are in host byte order; unused bytes are zero. */
struct sock_key {
	__u32 family;
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u16 local_port;
	__u16 remote_port;
};

/* How a connection's two ends come to be in the map. A socket alone in the map gains nothing and
 * gets the sockmap receive path with its kernel limitations (README), so both ends join or
 * neither does. The client (active) end establishes first and joins only when it connected to a
 * listener of the cgroup (listeners map). The server end joins only if it finds its client
 * PENDING and confirms it. A client still PENDING when it receives its first packet has a server
 * that will never join: it is EVICTED. The compare-and-swap between the two makes sure nothing is
 * ever redirected into an evicted socket. */
enum sock_join {
	JOIN_PENDING = 1,
	JOIN_CONFIRMED = 2,
	JOIN_EVICTED = 3,
};

/* Per-socket state kept beside the sockhash: where the socket lives in kernel memory, so that a
 * sender can read its peer's receive-side fields (the sockhash lookup cannot be used from sk_msg). */
struct sock_info {
	__u64 sk;
	__u64 join;  /* enum sock_join; 64 bits for compare-and-swap on every BPF CPU version */
};

/* A listening socket in the cgroup: a client end joins only when it connects to one of these, so
 * that its server end will join too. ip is zero for a wildcard bind. */
struct listener_key {
	__u32 family;
	__u32 ip[4];
	__u16 port;
	__u16 _pad;
};

enum bypass_scope {
	SCOPE_LOOPBACK = 0, /* 127.0.0.0/8, ::1 */
	SCOPE_HOST = 1,     /* loopback plus this host's own addresses (host_addrs) */
	SCOPE_ALL = 2,
};

struct bypass_config {
	__u32 scope;        /* enum bypass_scope */
	__u32 ports_only;   /* 1: only connections with an end in allowed_ports */
	__u32 queue_floor;  /* bytes a peer may have queued before sends fall back to TCP, at least */
};

struct host_addr {
	__u32 family;
	__u32 ip[4];
};

/* Per-CPU counters; the tool sums them. */
struct bypass_counters {
	__u64 sockets_inserted;
	__u64 insert_failed;        /* sockhash full or the tuple already present */
	__u64 peer_not_bypassed;    /* an end whose peer will not join (not a listener of the cgroup) */
	__u64 evicted_lonely;       /* client end whose server never joined: taken out again */
	__u64 redirected_msgs;
	__u64 redirected_bytes;
	__u64 passed_msgs;          /* messages that took the normal TCP path, for any reason below */
	__u64 passed_bytes;
	__u64 passed_no_peer;       /* peer not in the map (another host, outside the cgroup, not yet) */
	__u64 passed_unread_plain;  /* the peer has not read all data that went the TCP way: order */
	__u64 passed_peer_full;     /* the peer's receive queue is over its limit: memory bound */
	__u64 redirect_failed;      /* peer left the map between the check and the redirect */
};

#endif
