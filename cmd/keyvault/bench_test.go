package main

import (
	"errors"
	"fmt"
	"testing"

	"github.com/keyvault/keyvault/internal/loadgen"
	"github.com/keyvault/keyvault/vault"
)

// A raw HSM call the pool shed counts as the API's 503, "unavailable",
// which make bench accepts as shedding; any other error fails it.
func TestHSMErrorCodes(t *testing.T) {
	shed := hsmError{fmt.Errorf("%w: hsm hmac: shed, no session free within 50ms", vault.ErrUnavailable)}
	if got := loadgen.Code(shed); got != "unavailable" {
		t.Errorf("a shed operation is coded %q, want unavailable", got)
	}
	if got := loadgen.Code(hsmError{errors.New("pkcs11: 0x5: CKR_GENERAL_ERROR")}); got != "error" {
		t.Errorf("an HSM failure is coded %q, want error", got)
	}
	if !errors.Is(shed, vault.ErrUnavailable) {
		t.Error("the coded error no longer wraps the pool's")
	}
}
