// Package config loads, checks and documents the keyvault YAML configuration.
//
// A keyvault process reads one YAML file at start ([Load]) and refuses to run
// if anything in it is wrong. Every problem is reported at once, each on its
// own line as "key.path: message", for example:
//
//	hsm.members[0].pni: unknown key (line 14)
//	store.path: required
//	clients[1].token_sha256: required
//
// # Strictness
//
// The file is first parsed into a YAML node tree, which is walked against the
// yaml tags of [Config] before anything is decoded. That walk reports, with
// their full key path and line:
//
//   - unknown keys (a typo must not silently turn a setting off);
//   - duplicate keys (YAML would otherwise let the later one win);
//   - values of the wrong shape or type: a string where an integer is
//     expected, "yes" where a boolean is expected (only true and false are
//     booleans), a float where an integer is expected, a list item left empty;
//   - an HSM PIN written inline (keys pin, pin_value, password, ... inside a
//     member): PINs come from pin_env or pin_file so that the config file
//     itself can be world-readable and checked into a repository.
//
// An empty file, a file of only comments, or a file with more than one YAML
// document is refused. The walk prunes every key and value it reports, and
// the rest of the file is decoded and its values checked ([Config.Validate])
// in the same pass, so one run lists a typo and a bad address together. A
// value pruned for its type is not reported again as missing; a field whose
// key was misspelt keeps its default, and is checked as such (a misspelt
// required key is also reported as required).
//
// Error messages never repeat a value from the file that could be a secret:
// they name the key and the line, not the value.
//
// # Defaults
//
// Every optional field has a default, applied by [Parse] before the file is
// decoded, so a key that is absent or written with no value (null) keeps its
// default, while an explicit value is always checked: "max_sessions: 0" is an
// error, not a request for the default.
//
//	listen                         127.0.0.1:8080   ([DefaultListen])
//	admin_listen                   127.0.0.1:9090   ([DefaultAdminListen])
//	insecure_plaintext             false
//	tls                            absent: plain HTTP, loopback only
//	admin_tls                      absent: plain HTTP; an admin token then needs loopback
//	admin_insecure_plaintext       false
//	max_connections                4096             ([DefaultMaxConnections])
//	admin_max_connections          32               ([DefaultAdminMaxConnections])
//	http_timeouts.read_header      10s              ([DefaultReadHeaderTimeout])
//	http_timeouts.read             30s              ([DefaultReadTimeout])
//	http_timeouts.write            30s              ([DefaultWriteTimeout])
//	http_timeouts.idle             2m               ([DefaultIdleTimeout])
//	store.driver                   bolt             ([DriverBolt]; or etcd)
//	store.etcd.key_prefix          /keyvault/       ([DefaultEtcdKeyPrefix])
//	store.etcd.dial_timeout        5s               ([DefaultEtcdDialTimeout])
//	store.etcd.request_timeout     5s               ([DefaultEtcdRequestTimeout])
//	store.etcd.heartbeat_interval  2s               ([DefaultEtcdHeartbeat])
//	store.etcd.tls                 absent: plain connections
//	store.etcd.insecure_plaintext  false: http:// endpoints on loopback only
//	hsm.module_env                 empty
//	hsm.members[].max_sessions     8                ([DefaultMaxSessions])
//	budget.default_max_attempts    10               ([DefaultMaxAttempts])
//	budget.max_attempts_limit      20               ([DefaultMaxAttemptsLimit])
//	budget.escalating_delay        free_guesses 5, base 1m (base 0s: off)
//	clients[].namespace            the client's name
//	clients[].share_namespace      false
//	log.level                      info             ([DefaultLogLevel])
//	log.format                     json             ([DefaultLogFormat])
//	log.audit                      empty: the log's stream, at every level
//
// [Config.Validate] checks a Config as it is and applies no defaults; a Config
// built by hand must set these fields itself.
//
// # Paths
//
// Relative paths (store.path, tls files, modules, PIN files) are relative to
// the working directory of the process, not to the config file. [Parse] and
// [Load] check that the files exist (os.Stat); [ParseNoFS] skips those checks
// and exists to lint configs shipped for other machines, as
// TestShippedConfigs does for every file under deploy/.
//
// # Schema
//
// keyvault.schema.json is the JSON Schema (draft 2020-12) of the file, for
// editors (yaml-language-server: add
// "# yaml-language-server: $schema=<path>/keyvault.schema.json" on the
// first line). It is generated from the types of this package by
// `go generate ./config`, and a test keeps it current. It knows the keys,
// types, allowed values and defaults; the vault also checks files,
// addresses and rules across keys, so `keyvault config check` has the last
// word.
//
// # Caveats
//
// hsm.module_env is applied to the whole process before any PKCS#11 module is
// loaded, so one process sees one SoftHSM configuration (SOFTHSM2_CONF). The
// HSM PIN is not read at load time: [Member.PIN] reads it when the HSM is
// opened, so a missing PIN variable is reported then, by member name.
package config

//go:generate go run ./internal/schemagen -o keyvault.schema.json
