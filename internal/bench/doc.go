// Package bench holds the workloads of "keyvault bench" and the verdict on
// a run. loadgen drives them; the command reads the flags and prints.
//
// # Workloads
//
// HSM performs exactly the HSM calls of one recover or one enroll straight
// through an HSM pool, with inputs sized by vault.SizesFor: the raw
// ceiling, with no HTTP and no store. HTTP loads a running vault through
// the Go client: it enrolls its users first, gives each loadgen worker its
// own share of them, and checks every recovered secret.
//
// # Errors
//
// Every failed operation is coded as the API codes it (the problem code,
// http_NNN, timeout or transport), so loadgen counts it by that code. A
// 503 unavailable is the vault shedding load to protect its HSMs and is
// not a failure of the run; Verdict judges the rest against a threshold
// and says, for each limit that refused, what to change.
package bench
