package vault

// Sizes are the byte lengths of what the vault hands the HSM for one
// backup: the PIN MAC's message (HMAC under the PIN key, on every enroll
// and recover), and the outer seal's nonce, associated data and plaintext
// (Seal on an enroll, Open of the same lengths plus the tag on a recover).
// A load generator that calls the HSM directly sizes its calls by them.
type Sizes struct {
	PINMACInput int // label, namespace, user_id, generation, salt, PIN
	OuterNonce  int
	OuterAAD    int // label, namespace, user_id, generation, key versions
	Inner       int // the inner layer: its nonce, the secret, its GCM tag
}

// SizesFor returns the sizes for a backup of a secret of secretLen bytes
// under a PIN of pinLen bytes, for userID in namespace ns.
func SizesFor(ns, userID string, secretLen, pinLen int) Sizes {
	tag := 16 // GCM's tag, the inner layer's overhead
	if g, err := innerGCM(make([]byte, derivedKeyBytes)); err == nil {
		tag = g.Overhead()
	}
	return Sizes{
		PINMACInput: len(pinMACInput(ns, userID, 0, make([]byte, saltLen), make([]byte, pinLen))),
		OuterNonce:  nonceLen,
		OuterAAD:    len(outerAAD(ns, userID, 0, 0, 0)),
		Inner:       nonceLen + secretLen + tag,
	}
}
