// Package p11raw makes the few PKCS#11 calls whose output buffer keyvault
// sizes itself: a single-part C_Sign and a single C_Encrypt or C_Decrypt.
//
// crypto11 and miekg/pkcs11 always ask the token for the output size first
// (a call with a NULL buffer), and tokens answer that question badly:
// opencryptoki 3.8 crashes the process on a multi-part HMAC's size query,
// and NSS's softoken answers a GCM size without the 16-byte tag, so the
// second call fails with CKR_BUFFER_TOO_SMALL. The output sizes of
// HMAC-SHA256 and GCM are known in advance, so one call with a buffer of
// that size is both portable and cheaper.
//
// It calls through the function list of a miekg/pkcs11 handle, whose
// sessions and object handles it uses.
package p11raw

/*

// The part of the PKCS#11 ABI used here (PKCS#11 v2.40, section 5, on
// Unix: no structure packing). The function list's entries are in the
// order the standard fixes; only the first 44 are named.
typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_ULONG CK_OBJECT_HANDLE;
typedef unsigned char CK_BYTE;

typedef struct { CK_ULONG mechanism; void *pParameter; CK_ULONG ulParameterLen; } kv_mechanism;
typedef struct {
	CK_BYTE *pIv; CK_ULONG ulIvLen; CK_ULONG ulIvBits;
	CK_BYTE *pAAD; CK_ULONG ulAADLen; CK_ULONG ulTagBits;
} kv_gcm_params;

typedef CK_RV (*kv_init_fn)(CK_SESSION_HANDLE, kv_mechanism *, CK_OBJECT_HANDLE);
typedef CK_RV (*kv_one_fn)(CK_SESSION_HANDLE, CK_BYTE *, CK_ULONG, CK_BYTE *, CK_ULONG *);
typedef void (*kv_any_fn)(void);

typedef struct {
	CK_BYTE version[2];
	kv_any_fn before_encrypt[29]; // C_Initialize .. C_FindObjectsFinal
	kv_init_fn C_EncryptInit;
	kv_one_fn C_Encrypt;
	kv_any_fn C_EncryptUpdate, C_EncryptFinal;
	kv_init_fn C_DecryptInit;
	kv_one_fn C_Decrypt;
	kv_any_fn C_DecryptUpdate, C_DecryptFinal;
	kv_any_fn digest[5]; // C_DigestInit .. C_DigestFinal
	kv_init_fn C_SignInit;
	kv_one_fn C_Sign;
} kv_function_list;

static CK_RV kv_sign(kv_function_list *f, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE k, CK_ULONG mech,
		CK_BYTE *msg, CK_ULONG mlen, CK_BYTE *out, CK_ULONG *outlen) {
	kv_mechanism m = {mech, NULL, 0};
	CK_RV rv = f->C_SignInit(s, &m, k);
	if (rv != 0) return rv;
	return f->C_Sign(s, msg, mlen, out, outlen);
}

static CK_RV kv_gcm(kv_function_list *f, int encrypt, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE k,
		CK_BYTE *iv, CK_ULONG ivlen, CK_BYTE *aad, CK_ULONG aadlen,
		CK_BYTE *in, CK_ULONG inlen, CK_BYTE *out, CK_ULONG *outlen) {
	kv_gcm_params p = {iv, ivlen, ivlen * 8, aad, aadlen, 128};
	kv_mechanism m = {0x1087, &p, sizeof p}; // CKM_AES_GCM
	CK_RV rv = encrypt ? f->C_EncryptInit(s, &m, k) : f->C_DecryptInit(s, &m, k);
	if (rv != 0) return rv;
	return encrypt ? f->C_Encrypt(s, in, inlen, out, outlen) : f->C_Decrypt(s, in, inlen, out, outlen);
}

// The token reads and writes the buffers passed only within the call, and
// never calls into Go: the Go values they point to, the output lengths
// among them, can stay on the stack.
#cgo noescape kv_sign
#cgo nocallback kv_sign
#cgo noescape kv_gcm
#cgo nocallback kv_gcm
*/
import "C"

import (
	"bytes"
	"errors"
	"fmt"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// TagSize is the GCM tag length used: 128 bits.
const TagSize = 16

// Module is the function list of one miekg/pkcs11 handle.
type Module struct {
	fl *C.kv_function_list
}

// miekgCtx mirrors the layout of miekg/pkcs11's Ctx (v1.1.x): a pointer
// to a C struct { void *handle; CK_FUNCTION_LIST_PTR sym; }. miekg keeps
// the function list private, and it must be that very list: p11-kit-proxy
// gives every C_GetFunctionList a state of its own, whose sessions and
// slots the others do not know.
type miekgCtx struct {
	c *struct {
		handle unsafe.Pointer
		sym    *C.kv_function_list
	}
}

// FromCtx returns the function list of p, which must be initialised.
func FromCtx(p *pkcs11.Ctx) (*Module, error) {
	c := (*miekgCtx)(unsafe.Pointer(p)).c
	if c == nil || c.sym == nil {
		return nil, errors.New("p11raw: miekg/pkcs11 handle without a function list")
	}
	// A function list starts with the Cryptoki version it implements: a
	// check that the layout above still matches miekg's.
	if v := c.sym.version[0]; v != 2 && v != 3 {
		return nil, fmt.Errorf("p11raw: function list of Cryptoki version %d: miekg/pkcs11's layout changed?", v)
	}
	return &Module{fl: c.sym}, nil
}

// List is the function list m calls through, for a test that emulates a
// token's traits around it (see package p11rawtest).
func (m *Module) List() unsafe.Pointer { return unsafe.Pointer(m.fl) }

// FromList returns a Module that calls through the function list at l,
// which must start as a PKCS#11 v2.40 function list does.
func FromList(l unsafe.Pointer) *Module { return &Module{fl: (*C.kv_function_list)(l)} }

// empty stands in for an empty input: some tokens refuse a NULL data
// pointer even with a length of 0 (CKR_ARGUMENTS_BAD).
var empty [1]byte

// ptr returns a pointer to b's first byte, or to empty for an empty b.
func ptr(b []byte) *C.CK_BYTE {
	if len(b) == 0 {
		return (*C.CK_BYTE)(unsafe.Pointer(&empty[0]))
	}
	return (*C.CK_BYTE)(unsafe.Pointer(&b[0]))
}

// Sign computes a MAC or signature of msg with mech under key in one
// C_SignInit and one single-part C_Sign, into a buffer of size bytes.
func (m *Module) Sign(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, mech uint, msg []byte, size int) ([]byte, error) {
	out := make([]byte, size)
	n := C.CK_ULONG(len(out))
	rv := C.kv_sign(m.fl, C.CK_SESSION_HANDLE(s), C.CK_OBJECT_HANDLE(key), C.CK_ULONG(mech),
		ptr(msg), C.CK_ULONG(len(msg)), ptr(out), &n)
	if rv != 0 {
		return nil, pkcs11.Error(rv)
	}
	if int(n) > len(out) {
		return nil, fmt.Errorf("C_Sign wrote %d bytes into a buffer of %d", n, len(out))
	}
	return out[:n], nil
}

// ErrTokenChoseIV: a GCM seal wrote an IV of the token's choosing over the
// caller's, as HSMs that generate the GCM IV themselves do (AWS CloudHSM,
// Thales Luna in FIPS mode). The ciphertext is under the token's IV, not
// the caller's nonce, so SealGCM refuses it.
var ErrTokenChoseIV = errors.New("the token wrote a GCM IV of its own choosing over the caller's nonce (an HSM that generates the GCM IV)")

// SealGCM encrypts plaintext with AES-GCM (96-bit nonce, 128-bit tag)
// under key in one C_EncryptInit and one C_Encrypt, into a buffer of
// len(plaintext)+TagSize bytes: the ciphertext followed by the tag. The
// token gets a copy of nonce, and a token that writes another IV into it
// fails the seal with ErrTokenChoseIV: the caller's nonce, which it
// stores, must be the one used, and the caller's buffer (a shared
// constant, for a check value) must not change under it.
func (m *Module) SealGCM(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, nonce, plaintext, aad []byte) ([]byte, error) {
	iv := bytes.Clone(nonce)
	out, err := m.gcm(1, s, key, iv, plaintext, aad, len(plaintext)+TagSize)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(iv, nonce) {
		return nil, ErrTokenChoseIV
	}
	return out, nil
}

// ErrTokenKeptIV: a seal that asked the token for its own GCM IV got the
// zeroed buffer back: the token used the all-zero IV it was given.
var ErrTokenKeptIV = errors.New("the token left the GCM IV buffer zeroed: it does not generate the IV, and used an all-zero one")

// SealGCMTokenIV encrypts as SealGCM, for a token that chooses the GCM IV
// itself: it passes a zeroed buffer of ivSize bytes and returns the IV the
// token wrote there with the ciphertext. A token that leaves the buffer
// zeroed sealed under the all-zero IV: the result is discarded
// (ErrTokenKeptIV).
func (m *Module) SealGCMTokenIV(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, ivSize int, plaintext, aad []byte) (iv, ciphertext []byte, err error) {
	iv = make([]byte, ivSize)
	ciphertext, err = m.gcm(1, s, key, iv, plaintext, aad, len(plaintext)+TagSize)
	if err != nil {
		return nil, nil, err
	}
	if bytes.Equal(iv, make([]byte, ivSize)) {
		return nil, nil, ErrTokenKeptIV
	}
	return iv, ciphertext, nil
}

// OpenGCM decrypts and authenticates ciphertext (with its tag) in one
// C_DecryptInit and one C_Decrypt.
func (m *Module) OpenGCM(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, nonce, ciphertext, aad []byte) ([]byte, error) {
	if len(ciphertext) < TagSize {
		return nil, fmt.Errorf("GCM ciphertext of %d bytes is shorter than its tag", len(ciphertext))
	}
	// Some tokens want room for the whole input before they have checked
	// the tag; the plaintext is shorter.
	return m.gcm(0, s, key, nonce, ciphertext, aad, len(ciphertext))
}

func (m *Module) gcm(encrypt C.int, s pkcs11.SessionHandle, key pkcs11.ObjectHandle, nonce, in, aad []byte, size int) ([]byte, error) {
	out := make([]byte, max(size, 1))
	n := C.CK_ULONG(size)
	rv := C.kv_gcm(m.fl, encrypt, C.CK_SESSION_HANDLE(s), C.CK_OBJECT_HANDLE(key),
		ptr(nonce), C.CK_ULONG(len(nonce)), ptr(aad), C.CK_ULONG(len(aad)),
		ptr(in), C.CK_ULONG(len(in)), ptr(out), &n)
	if rv != 0 {
		return nil, pkcs11.Error(rv)
	}
	if int(n) > size {
		return nil, fmt.Errorf("C_Encrypt or C_Decrypt wrote %d bytes into a buffer of %d", n, size)
	}
	return out[:n], nil
}
