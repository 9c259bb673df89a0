/* SPDX-License-Identifier: GPL-2.0 */
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

/* Where a socket of the cgroup stands. Any socket in the sockhash gets the kernel's tcp_bpf
 * receive path, which differs from TCP for blocking and splicing readers (README, "Known
 * kernel limitations"), so a socket enters the map only once netbpf has seen how its owner
 * reads it, and only together with its peer:
 *
 *   WAITING  plain TCP; `reason` says what it waits for
 *   READY    qualifies; waits for its peer to qualify too
 *   JOINED   in the sockhash; its peer may redirect into it
 *   LEAVING  in the sockhash, no longer redirected into; leaves once its queue is read
 *   LEFT     out of the sockhash again, plain TCP for the rest of its life
 *
 * The join iterator (run by the agent) finds the sockets of the cgroup in the processes' open
 * files and moves them on; sk_msg redirects only into JOINED peers. */
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
	REASON_NOT_READ = 3,      /* its owner has not read from it yet: splice or recv unknown */
	REASON_SPLICED = 4,       /* read with splice/sendfile, or its service was */
	REASON_RCVLOWAT = 5,      /* SO_RCVLOWAT set: tcp_bpf reports readiness below it */
	REASON_PEER_OUTSIDE = 6,  /* the other end is not a socket of the cgroup */
	REASON_DETACH = 7,        /* the bypass is being detached */
	REASON_INSERT_FAILED = 8, /* the sockhash refused it (full, or another bypass has it) */
	REASON_PEER_WAITING = 9,  /* it qualifies (READY); its peer does not yet */
	REASON_MAX = 10,
};

/* Per-socket state beside the sockhash, made by the join iterator (or by the splice
 * tracepoint, for a socket spliced before the iterator saw it). `sk` lets a sender read its
 * peer's receive-side fields (a sockhash lookup cannot be used from sk_msg). */
struct sock_info {
	__u64 sk;
	__u64 since_ns;          /* when state last changed */
	__u64 redirected_bytes;  /* redirected into this socket */
	__u64 seen_round;        /* the last agent round that saw the socket; the agent drops older */
	__u64 first_round;       /* the round that found it */
	__u32 state;             /* enum sock_state */
	__u32 reason;            /* enum plain_reason */
	__u32 reasons_seen;      /* bit per reason this socket was kept plain for (counted once) */
	__u32 pid;               /* a process that has it open (the join iterator found it there) */
	__u16 service_port;      /* the server end's port: a spliced service stays plain */
	__u8 spliced;            /* its owner spliced from it or sendfile()d from it */
	__u8 _pad;
	char comm[16];           /* that process's name */
};

enum bypass_scope {
	SCOPE_LOOPBACK = 0, /* 127.0.0.0/8, ::1 */
	SCOPE_HOST = 1,     /* loopback plus this host's own addresses (host_addrs) */
	SCOPE_ALL = 2,
};

/* What changes while attached. */
struct bypass_control {
	__u64 round;      /* the agent's round number, stamped on each socket the iterator sees */
	__u32 detaching;  /* 1: redirect nothing more; the join iterator empties the map */
	__u32 agent_pid;  /* the process that runs the join iterator, 0 when none */
};

struct host_addr {
	__u32 family;
	__u32 ip[4];
};

/* Per-CPU counters; the tool sums them. */
struct bypass_counters {
	__u64 established;          /* connections of the cgroup established: the agent looks soon */
	__u64 candidates;           /* sockets of the cgroup in scope that the agent found */
	__u64 sockets_inserted;     /* joined the sockhash */
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
	__u64 passed_peer_unsafe;   /* peer spliced or set SO_RCVLOWAT: stops at once */
	__u64 passed_unread_plain;  /* the peer has not read all data that went the TCP way: order */
	__u64 passed_peer_full;     /* the peer's receive queue is over its limit: memory bound */
	__u64 passed_detaching;     /* detach in progress */
	__u64 passed_shut_down;     /* the sender shut its sending side down: TCP's EPIPE */
	__u64 redirect_failed;      /* peer left the map between the check and the redirect */
};

#endif
