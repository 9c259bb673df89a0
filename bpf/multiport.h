/* SPDX-License-Identifier: GPL-2.0 */
/* multiport: the structs both sides read. Python decodes them from the object's BTF. */
#ifndef MULTIPORT_H
#define MULTIPORT_H

#define MP_COMM_LEN 16

/* One remapped socket: a process bound `virtual_port` and got `real_port`. Keyed by socket cookie. */
struct mapping {
	__u16 virtual_port;
	__u16 real_port;
	__u8 protocol;      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;        /* AF_INET or AF_INET6 */
	__u8 v6only;        /* IPV6_V6ONLY was set before bind: "::" takes no IPv4 */
	__u8 _pad;
	__u32 pid;
	__u32 addr[4];      /* the address bound, network order (IPv4 in addr[0]) */
	__u64 cgroup_id;
	char comm[MP_COMM_LEN];
};

/* real port (per protocol) -> its virtual port, for recvmsg and the tracepoint mode */
struct real_port_key {
	__u16 port;
	__u8 protocol;
	__u8 _pad;
};

struct real_port {
	__u16 virtual_port;
	__u8 family;        /* of the socket that owns it, and the address it bound (as in mapping) */
	__u8 v6only;
	__u32 addr[4];
	__u64 cookie;       /* the socket that owns it: only that socket's release removes it */
	__u64 cgroup_id;
};

/* Per-socket state (socket-local storage, cloned to accepted sockets). */
struct sock_state {
	__u16 virtual_port; /* we bound this socket: getsockname shows virtual_port for real_port */
	__u16 real_port;
	__u16 peer_virtual; /* we redirected its connect: getpeername shows peer_virtual for peer_real */
	__u16 peer_real;
	__u8 v6only;        /* IPV6_V6ONLY at bind (it cannot change after bind) */
	__u8 _pad[3];
};

struct multiport_counters {
	__u64 binds_remapped;
	__u64 binds_privileged_refused;
	__u64 connects_redirected;
	__u64 connects_no_listener;
	__u64 datagrams_redirected;
	__u64 names_rewritten;
	__u64 released;
	__u64 mappings_full;       /* a remapped socket the full mappings or real_ports map refused */
};

#endif
