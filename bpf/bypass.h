/* SPDX-License-Identifier: GPL-2.0 */
/* bypass: the structs both sides read. Python decodes them from the object's BTF. */
#ifndef BYPASS_H
#define BYPASS_H

/* One end of a TCP connection, seen from that end, in its network namespace (netns: the inode
 * number of /proc/PID/ns/net). IPv4 (and IPv4-mapped IPv6) addresses are family AF_INET in
 * ip[0]; ports are in host byte order; unused bytes are zero. Within one namespace a tuple names
 * one live connection end; across namespaces it names nothing: any user can make a namespace
 * (unshare -Urn) and build a pair with another connection's exact tuple there. */
struct sock_key {
	__u32 family;
	__u32 netns;
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u16 local_port;
	__u16 remote_port;
};

/* Where a socket of the cgroup stands. Any socket in the sockhash gets the kernel's tcp_bpf
 * receive path, which differs from TCP for blocking readers whatever is redirected to them
 * (README, "Known kernel limitations"), so a socket enters the map only while its file is
 * non-blocking (and not spliced, no SO_RCVLOWAT), and only together with its peer:
 *
 *   WAITING  plain TCP; `reason` says what it waits for
 *   READY    qualifies; waits for its peer to qualify too (or for its next segment, where the
 *            tc program joins)
 *   JOINED   in the sockhash: its sends are redirected once its peer reads. Data is redirected
 *            into it only once its owner has read from it, and not with splice (`reader`):
 *            a splice never sees redirected data
 *   LEAVING  in the sockhash, no longer redirected into; leaves once its queue is read
 *   LEFT     out of the sockhash again, plain TCP for the rest of its life
 *
 * The tc program on lo joins a loopback pair on the first segment after both ends qualify;
 * the agent's sweep (an iterator) joins what tc cannot see, and takes sockets out again. */
enum sock_state {
	STATE_WAITING = 1,
	STATE_READY = 2,
	STATE_JOINED = 3,
	STATE_LEAVING = 4,
	STATE_LEFT = 5,
};

/* Why a socket is (still) plain TCP, or why it left the map. */
enum plain_reason {
	REASON_NONE = 0,
	REASON_NO_FILE = 1,       /* accepted but not yet accept()ed: no file to judge */
	REASON_BLOCKING = 2,      /* its file is blocking: tcp_bpf turns waits into EAGAIN */
	REASON_SPLICED = 3,       /* read with splice/sendfile, or its service was */
	REASON_RCVLOWAT = 4,      /* SO_RCVLOWAT set: tcp_bpf reports readiness below it */
	REASON_PEER_OUTSIDE = 5,  /* the other end is not a socket of the cgroup */
	REASON_DETACH = 6,        /* the bypass is being detached */
	REASON_INSERT_FAILED = 7, /* the sockhash refused it (full, or another bypass has it) */
	REASON_PEER_WAITING = 8,  /* it qualifies (READY); its peer does not yet */
	REASON_CONFLICT = 9,      /* two sockets claimed to be its peer: it trusts neither */
	REASON_MAX = 10,
};

/* How a socket's peer was proven: never by addresses alone (bypass.bpf.c, "the proof").
 * PEER_CONFLICT in sock_info.peer: two sockets claimed to be its peer. */
#define PEER_CONFLICT (~0ULL)

/* Entries a full map refused, by map: each costs a chance to join, never a byte. */
struct map_full {
	__u64 sock_info;
	__u64 sock_tuples;
	__u64 handshakes;
	__u64 listeners;
	__u64 spliced_services;
	__u64 netns_seen;
};

/* Per-socket state beside the sockhash, keyed by the socket's cookie (never reused, so no other
 * socket can take over an entry), made by whatever meets the socket first. `sk` lets its peer's
 * sender read the receive-side fields (a sockhash lookup cannot be used from sk_msg); the entry
 * holds no reference on the socket: see bypass_sk_msg for why following it is safe. The fields
 * below "its own sends" are written only by this socket's sk_msg, under this socket's lock: what
 * a sender trusts about its peer is read from the peer's socket, never written by another
 * socket's programs. The enums' names reach Python through the object's BTF. */
struct sock_info {
	__u64 sk;
	__u64 cookie;            /* its socket cookie: its key here and in the sockhash */
	__u64 peer;              /* its proven peer's cookie, recorded once (0: none yet; PEER_CONFLICT) */
	__u64 nonce;             /* the handshake nonce it sends (0: none) */
	__u64 handshake;         /* its connection's entry in handshakes (the active end's nonce), 0: none */
	__u64 inserting;         /* set by the one program that inserts it into the sockhash */
	__u64 since_ns;          /* when state last changed */
	__u64 seen_round;        /* the last agent round that saw the socket; the agent drops older */
	__u64 first_round;       /* the round that found it */
	__u64 inode;             /* its socket inode ("socket:[N]" in /proc/PID/fd): status finds the owner */
	__u64 reasons_seen;      /* bit per reason this socket was kept plain for (counted once) */
	/* its own sends */
	__u64 redirected_bytes;  /* redirected from it into its peer */
	__u64 consumed_mark;     /* bytes its peer had read of those when queue_limit last grew */
	__u32 queue_limit;       /* bytes its peer may have queued before its sends take TCP (0: not set yet) */
	__u32 queue_budget;      /* bytes it may still redirect before reading its peer's queue again */
	__u8 peer_reads;         /* its peer's owner has read (not by splice): redirects may go in */
	__u8 peer_ordered;       /* its peer has read all it sent the TCP way, and it sent none since */
	__u8 nonce_segments;     /* segments that carried its nonce (the active end's) */
	/* the socket itself */
	__u8 spliced;            /* its owner spliced from it or sendfile()d from it */
	__u16 service_port;      /* the server end's port: a spliced service stays plain */
	__u8 indexed;            /* the sweep put its tuple in sock_tuples */
	__u8 _pad;
	enum sock_state state;
	enum plain_reason reason;
	struct sock_key key;     /* its tuple, in its namespace */
};

/* A connection between network namespaces (or through address translation) is proven by two
 * nonces in a TCP option: the active end sends one on its first segments after the handshake,
 * the passive end finds it on the segment that completes its own handshake and answers with one
 * of its own, which the active end must receive in turn. Keyed by the active end's nonce. */
struct handshake {
	__u64 active;         /* cookie of the end that sent it */
	__u64 passive;        /* cookie of the first end that received it */
	__u64 passive_nonce;  /* what that end answers with */
	__u64 claims;         /* how many ends received it: more than one, and none is trusted */
};

enum bypass_scope {
	SCOPE_LOOPBACK = 0, /* 127.0.0.0/8, ::1 */
	SCOPE_HOST = 1,     /* loopback plus this host's own addresses (host_addrs) */
	SCOPE_ALL = 2,
};

/* What changes while attached. */
struct bypass_control {
	__u64 round;      /* the agent's round number, stamped on each socket the sweep sees */
	__u32 detaching;  /* 1: redirect nothing more; the join iterator empties the map */
	__u32 agent_pid;  /* the process that runs the join iterator, 0 when none */
	__u64 agent_seen_ns; /* CLOCK_MONOTONIC when the agent last said it runs, 0 before it did */
};

/* An agent not seen for this long is gone (killed): nothing more joins or is redirected. */
#define AGENT_LOST_NS (60ULL * 1000000000ULL)

struct host_addr {
	__u32 family;
	__u32 ip[4];
};

/* Per-CPU counters; the tool sums them. */
struct bypass_counters {
	__u64 established;          /* connections of the cgroup established */
	__u64 established_for_sweep; /* of those, where the tc program does not join: the agent looks soon */
	__u64 candidates;           /* sockets of the cgroup in scope that netbpf found */
	__u64 sockets_inserted;     /* joined the sockhash */
	__u64 inserted_by_event;    /* of those, joined by the tc program (the rest by the sweep) */
	__u64 sockets_left;         /* left it again, each after its redirected queue was read */
	__u64 insert_failed;        /* sockhash refused */
	__u64 spliced;              /* sockets read with splice or sendfile */
	__u64 plain_by_reason[REASON_MAX]; /* sockets kept plain, each counted once per reason */
	__u64 left_by_reason[REASON_MAX];  /* sockets that left the map, by reason */
	__u64 redirected_msgs;
	__u64 redirected_bytes;
	__u64 passed_msgs;          /* messages that took the normal TCP path, for any reason below */
	__u64 passed_bytes;
	__u64 passed_no_peer;       /* peer not joined (another host, outside the cgroup, not yet) */
	__u64 passed_not_reading;   /* the peer has not read from its socket yet: it might splice */
	__u64 passed_peer_unsafe;   /* peer spliced or set SO_RCVLOWAT: stops at once */
	__u64 passed_unread_plain;  /* the peer has not read all data that went the TCP way: order */
	__u64 passed_peer_full;     /* the peer's receive queue is over its limit: memory bound */
	__u64 passed_detaching;     /* detach in progress */
	__u64 passed_shut_down;     /* the sender shut its sending side down: TCP's EPIPE */
	__u64 redirect_failed;      /* peer left the map between the check and the redirect */
	__u64 paired_by_handshake;  /* pairs proven by their handshake's nonce */
	__u64 conflicts;            /* a socket claimed by a second peer: neither is trusted */
	struct map_full map_full;
};

#endif
