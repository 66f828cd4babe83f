package hsmpool

import (
	"fmt"

	"github.com/keyvault/keyvault/vault"
)

// KeyVersion implements vault.HSM.
func (p *Pool) KeyVersion(role vault.KeyRole) uint32 { return p.keys.Load().versions[role] }

// WrapProfile implements vault.HSM.
func (p *Pool) WrapProfile(version uint32) vault.Profile { return p.keys.Load().profiles[version] }

// keySet is the pool's reference: the check value of every key all members
// hold, the newest version of each role, and the profile of each wrap key
// version. It is replaced whole, never changed in place.
type keySet struct {
	ref      map[vault.KeyID][]byte
	versions map[vault.KeyRole]uint32
	profiles map[uint32]vault.Profile
}

// newKeySet builds the reference from the check values and the wrap key
// profiles of one member; members with equal check values hold keys of
// the same kinds, since a wrap key's check value is a GCM tag or an HMAC
// by its kind.
func newKeySet(ref map[vault.KeyID][]byte, profiles map[uint32]vault.Profile) *keySet {
	ks := &keySet{ref: ref, versions: map[vault.KeyRole]uint32{}, profiles: map[uint32]vault.Profile{}}
	for id := range ref {
		ks.versions[id.Role] = max(ks.versions[id.Role], id.Version)
		if id.Role == vault.RoleWrap {
			ks.profiles[id.Version] = profiles[id.Version]
		}
	}
	return ks
}

// wrapProfiles lists the profiles of a token's wrap key versions.
func wrapProfiles(t token) map[uint32]vault.Profile {
	out := map[uint32]vault.Profile{}
	for _, v := range t.Versions(vault.RoleWrap) {
		out[v] = t.WrapProfile(v)
	}
	return out
}

// ProfileError: the newest wrap key is not of the configured profile, so
// new records cannot be sealed as configured.
type ProfileError struct {
	Want, Got vault.Profile
	Key       vault.KeyID // the newest wrap key
}

func (e *ProfileError) Error() string {
	return fmt.Sprintf("the configured profile (hsm.profile) is %s, but the newest wrap key, %s, is a key of the %s profile: "+
		"run keyvault keys rotate with this config to add a wrap key version of the %s profile (records sealed under older versions "+
		"keep opening by their own profile while every member can; keys rewrap moves them, keys retire then removes the old version), "+
		"or set hsm.profile: %s", e.Want, e.Key.Label(), e.Got, e.Want, e.Got)
}

// checkProfile refuses a key set whose newest wrap key is not of the
// configured profile ("" follows the keys).
func checkProfile(want vault.Profile, ks *keySet) error {
	newest := ks.versions[vault.RoleWrap]
	if want == "" || ks.profiles[newest] == want {
		return nil
	}
	return &ProfileError{Want: want, Got: ks.profiles[newest], Key: vault.KeyID{Role: vault.RoleWrap, Version: newest}}
}

func (p *Pool) ref() map[vault.KeyID][]byte { return p.keys.Load().ref }
