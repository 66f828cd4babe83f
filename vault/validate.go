package vault

// Limits of the API (docs/api.md, "Fields and problem codes").
const (
	maxUserIDLen = 128
	minSecretLen = 16
	maxSecretLen = 512
	minPINLen    = 4
	maxPINLen    = 128
	maxNSLen     = 64
)

// ValidUserID reports whether id is 1 to 128 characters from
// [A-Za-z0-9._~:@-].
func ValidUserID(id string) bool {
	if len(id) == 0 || len(id) > maxUserIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '.' || c == '_' || c == '~' || c == ':' || c == '@' || c == '-':
		default:
			return false
		}
	}
	return true
}

// ValidNamespace reports whether ns is 1 to 64 characters from [a-z0-9-].
func ValidNamespace(ns string) bool {
	if len(ns) == 0 || len(ns) > maxNSLen {
		return false
	}
	for i := 0; i < len(ns); i++ {
		c := ns[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func checkTarget(ns, userID string) error {
	if !ValidNamespace(ns) {
		return invalid("namespace", "must be 1 to 64 characters from [a-z0-9-]")
	}
	if !ValidUserID(userID) {
		return invalid("user_id", "must be 1 to 128 characters from [A-Za-z0-9._~:@-]")
	}
	return nil
}

// CheckPIN returns an ErrInvalid naming field unless pin is 4 to 128 bytes.
func CheckPIN(field string, pin []byte) error { return checkPIN(field, pin) }

func checkPIN(field string, pin []byte) error {
	if len(pin) < minPINLen || len(pin) > maxPINLen {
		return invalid(field, "must be 4 to 128 bytes")
	}
	return nil
}

// CheckSecret returns an ErrInvalid unless secret is 16 to 512 bytes.
func CheckSecret(secret []byte) error { return checkSecret(secret) }

func checkSecret(secret []byte) error {
	if len(secret) < minSecretLen || len(secret) > maxSecretLen {
		return invalid("secret", "must be 16 to 512 bytes")
	}
	return nil
}
