// Package p11rawtest emulates vendor traits of PKCS#11 tokens for tests, at
// the ABI: it puts functions of its own in a copy of a real token's
// function list, which do what the vendor's HSM does and then call the
// real token. Only tests import it.
package p11rawtest

/*
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

typedef unsigned long CK_ULONG;
typedef struct { CK_ULONG mechanism; void *pParameter; CK_ULONG ulParameterLen; } emu_mechanism;
typedef struct {
	unsigned char *pIv; CK_ULONG ulIvLen; CK_ULONG ulIvBits;
	unsigned char *pAAD; CK_ULONG ulAADLen; CK_ULONG ulTagBits;
} emu_gcm_params;
typedef CK_ULONG (*emu_init_fn)(CK_ULONG, emu_mechanism *, CK_ULONG);
typedef void (*emu_any_fn)(void);

// The first 44 entries of a PKCS#11 v2.40 function list, up to C_Sign:
// all that package p11raw calls. C_EncryptInit is the 30th.
typedef struct { unsigned char version[2]; emu_any_fn fn[44]; } emu_list;
enum { emu_encrypt_init = 29 };

// One real C_EncryptInit per process: the tests load one module.
static emu_init_fn emu_real_encrypt_init;
static int emu_strict;

// emu_token_iv_init is C_EncryptInit of an HSM that chooses the GCM IV:
// it writes random bytes into the caller's IV buffer, and encrypts under
// them. Strict, it refuses a buffer that is not zeroed, as AWS CloudHSM's
// library does.
static CK_ULONG emu_token_iv_init(CK_ULONG s, emu_mechanism *m, CK_ULONG k) {
	if (m != NULL && m->mechanism == 0x1087 && m->pParameter != NULL) { // CKM_AES_GCM
		emu_gcm_params *p = m->pParameter;
		if (p->pIv == NULL || p->ulIvLen != 12) return 0x71; // CKR_MECHANISM_PARAM_INVALID
		if (emu_strict) {
			for (int i = 0; i < 12; i++) if (p->pIv[i] != 0) return 0x71;
		}
		if (getrandom(p->pIv, 12, 0) != 12) return 0x6; // CKR_FUNCTION_FAILED
	}
	return emu_real_encrypt_init(s, m, k);
}

static void *emu_token_iv(void *real, int strict) {
	emu_list *l = malloc(sizeof *l);
	memcpy(l, real, sizeof *l);
	emu_real_encrypt_init = (emu_init_fn) l->fn[emu_encrypt_init];
	emu_strict = strict;
	l->fn[emu_encrypt_init] = (emu_any_fn) emu_token_iv_init;
	return l;
}
*/
import "C"

import "github.com/keyvault/keyvault/hsmpool/internal/p11raw"

// TokenChosenIV returns m as an HSM that generates the GCM IV itself (AWS
// CloudHSM; Thales Luna in FIPS mode): every CKM_AES_GCM encryption
// writes a random 12-byte IV of the token's into the caller's IV buffer
// (CK_GCM_PARAMS.pIv) and encrypts under it. Strict, a buffer that is not
// zeroed is refused with CKR_MECHANISM_PARAM_INVALID. Decryption is the
// real token's. The copy of the function list lives for the process.
func TokenChosenIV(m *p11raw.Module, strict bool) *p11raw.Module {
	s := C.int(0)
	if strict {
		s = 1
	}
	return p11raw.FromList(C.emu_token_iv(m.List(), s))
}
