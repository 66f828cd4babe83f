package boltstore

// SetAfterCommit makes every commit that succeeds report f's error instead
// (nil f: report success), as a commit that landed but whose final fsync
// failed would. Set it only while no write is in flight.
func SetAfterCommit(s *Store, f func() error) { s.failCommit = f }
