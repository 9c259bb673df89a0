/* SPDX-License-Identifier: GPL-2.0 */
/* SipHash-2-4 of two 64-bit words under a 128-bit key (Aumasson and Bernstein): a value nobody
 * without the key can predict, here for the bypass's handshake nonces. */
#ifndef NETBPF_SIPHASH_H
#define NETBPF_SIPHASH_H

#define SIP_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))

#define SIP_ROUND(v0, v1, v2, v3)                                                    \
	do {                                                                         \
		v0 += v1; v1 = SIP_ROTL(v1, 13); v1 ^= v0; v0 = SIP_ROTL(v0, 32);    \
		v2 += v3; v3 = SIP_ROTL(v3, 16); v3 ^= v2;                           \
		v0 += v3; v3 = SIP_ROTL(v3, 21); v3 ^= v0;                           \
		v2 += v1; v1 = SIP_ROTL(v1, 17); v1 ^= v2; v2 = SIP_ROTL(v2, 32);    \
	} while (0)

static __always_inline __u64 siphash_2u64(__u64 m0, __u64 m1, __u64 k0, __u64 k1)
{
	__u64 v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
	__u64 v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
	__u64 last = 16ULL << 56; /* the message's length in bytes, in the top byte */

	v3 ^= m0;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	v0 ^= m0;
	v3 ^= m1;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	v0 ^= m1;
	v3 ^= last;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	v0 ^= last;
	v2 ^= 0xff;
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	SIP_ROUND(v0, v1, v2, v3);
	return v0 ^ v1 ^ v2 ^ v3;
}

#endif
