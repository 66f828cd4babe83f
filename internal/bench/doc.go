// Package bench holds the workloads of "keyvault bench" and the verdict on
// a run. loadgen drives them; the command reads the flags and prints.
//
// # Workloads
//
// HSM performs exactly the HSM calls of one recover or one enroll straight
// through an HSM pool, with inputs sized by vault.SizesFor: the raw
// ceiling, with no HTTP and no store. HTTP loads a running vault: it
// enrolls its users first through the Go client, gives each loadgen worker
// its own share of them and its own keep-alive connection, sends each
// measured request written whole (loadgen.HTTPConn), and checks every
// recovered secret.
//
// # Cost
//
// On a machine the vault shares, the generator's CPU is the vault's loss,
// so the measured requests skip what the Go client does for a real caller
// (wiping buffers, retries, a random request ID, decoding every answer):
// bodies are written once per user, answers are read into a reused buffer
// and only a recovered secret is looked at. Run's result gives the CPU the
// work cost per operation and the generator's own per request.
//
// # Errors
//
// Every failed operation is coded as the API codes it (the problem code,
// http_NNN, timeout or transport), so loadgen counts it by that code. A
// 503 unavailable is the vault shedding load to protect its HSMs and is
// not a failure of the run; Verdict judges the rest against a threshold
// and says, for each limit that refused, what to change.
package bench
