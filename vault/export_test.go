package vault

// Test-only access to internals for the external test package (vault_test).
// The tests that drive a Vault must be external because they import
// vault/boltstore, which imports vault.

// Record is the stored record, so that tests can read and edit raw records
// as the store holds them.
type Record = record

// ParseRecord decodes a raw store value without checking its MAC.
func ParseRecord(b []byte) (*Record, error) {
	r, _, _, err := parseRecord(b)
	return r, err
}

// MarshalRecordBody encodes a record's MAC'd body (without the MAC).
func MarshalRecordBody(r *Record) []byte { return r.marshal() }

// RecordKey is the store key of a backup.
func RecordKey(ns, userID string) []byte { return recordKey(ns, userID) }

// ForgeRecord encodes r under key with a valid record MAC, as only someone
// holding the vault's in-memory MAC key could. Tests use it to reach the
// layers behind the record MAC (the PIN check and the AEAD associated data).
func (v *Vault) ForgeRecord(key []byte, r *Record) []byte {
	r.MACVersion = v.macVersion
	body := r.marshal()
	return appendRecordMAC(body, v.macKeys[v.macVersion], key, body)
}

// ErrUntold answers a guess whose check could be counted nowhere.
var ErrUntold = errUntold

// ForgeRecordFormat2 encodes r as format 2 wrote it (no sealing byte: all
// records were sealed by GCM in the HSM), under key with a valid record
// MAC: a record of a store written before format 3.
func (v *Vault) ForgeRecordFormat2(key []byte, r *Record) []byte {
	r.MACVersion = v.macVersion
	body := r.marshal()
	body = append(body[:62:62], body[63:]...)
	body[0] = recordFormatV2
	return appendRecordMAC(body, v.macKeys[v.macVersion], key, body)
}

// OuterAAD is the associated data of a record's outer layer.
func OuterAAD(ns, userID string, gen uint64, wrapVersion, pinVersion uint32) []byte {
	return outerAAD(ns, userID, gen, wrapVersion, pinVersion)
}
