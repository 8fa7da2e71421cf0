package disk

import (
	"github.com/pagedkv/pagedkv/prefix"
)

// ikey is a block's identity in the index: its namespace and prefix key.
type ikey struct {
	ns  prefix.Namespace
	key prefix.Key
}

// loc is where a block's record lies: its segment, its offset there and its padded bytes.
type loc struct {
	seg  *segment
	off  int64
	size int64
}

// segment is one append-only file of records, or a spare file kept for a later segment. Its fields are guarded by the store's mu, except
// fd and path, which are fixed from its creation until reap closes and deletes it.
type segment struct {
	seq  uint64
	path string
	fd   int
	base uint64 // bytes appended to the store before this segment's first: its age
	size int64  // the bytes of the records committed to it; a Put appends here
	// fsize is the file's bytes: size, or more where the file was a spare with older records
	// past size. Stats.Bytes counts fsize.
	fsize int64
	spare string // while an append reuses a spare file for it: the spare's name
	keys  []ikey // the keys of its records, in offset order; some may now live elsewhere
	live  int    // records the index points at
	// readers counts the Gets reading it now. A dead segment (evicted or emptied) is closed
	// and deleted once it has none.
	readers int
	dead    bool
}
