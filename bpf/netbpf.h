/* SPDX-License-Identifier: GPL-2.0 */
/* Definitions shared by every netbpf BPF program. */
#ifndef NETBPF_H
#define NETBPF_H

#define AF_INET 2
#define AF_INET6 10

#define TCP_ESTABLISHED 1
#define TCP_CLOSE 7
#define TCP_LISTEN 10

#define SEND_SHUTDOWN 2

#define EEXIST 17

/* uapi/linux/bpf.h's value. vmlinux.h holds only the enums some compilation unit of the kernel
 * used, and a small kernel's BTF (make kernel) lacks this one */
#define CURRENT_NETNS (-1)

#define NETBPF_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
