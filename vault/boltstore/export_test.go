package boltstore

// SetAfterCommit makes every commit that succeeds report f's error instead
// (nil f: report success), as a commit that landed but whose final fsync
// failed would. Set it only while no write is in flight.
func SetAfterCommit(s *Store, f func() error) { s.failCommit = f }

// SetOnEarly runs f in the committer right after a batch's early answers
// (CompareAndSwapEarly) went out, inside its transaction, before its
// commit; an error from f fails the transaction, as a commit that never
// landed. Set it only while no write is in flight.
func SetOnEarly(s *Store, f func() error) { s.onEarly = f }
