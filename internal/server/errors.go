package server

import "errors"

// ErrConfig marks an error in the config or in what it names (a TLS
// certificate, a PIN file, a connection cap above the file limit): the
// operator must change the config, so the command exits with status 2.
var ErrConfig = errors.New("config error")

// configError is an error the config caused; errors.Is finds ErrConfig
// and the cause in it.
type configError struct{ err error }

func (e configError) Error() string   { return e.err.Error() }
func (e configError) Unwrap() []error { return []error{e.err, ErrConfig} }
