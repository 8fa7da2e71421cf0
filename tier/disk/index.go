package disk

import (
	"github.com/pagedkv/pagedkv/prefix"
)

// ikey is a block's identity in the index: its namespace and prefix key.
type ikey struct {
	ns  prefix.Namespace
	key prefix.Key
}

// entry is one block the index knows. A pending entry is being written by a Put: it holds the
// key against a second writer but is not served, counted or evicted until the Put commits.
type entry struct {
	k          ikey
	path       string // the block's file
	size       uint64 // the file's bytes: header, data and padding
	pending    bool
	readers    int    // Gets reading the file now: a removed file they read is not reused
	prev, next *entry // LRU order, most recent after the root; nil while pending
}

// lru is a circular list of the committed entries through a root, most recently used first.
type lru struct{ root entry }

func (l *lru) init() { l.root.prev, l.root.next = &l.root, &l.root }

func (l *lru) pushFront(e *entry) {
	e.prev, e.next = &l.root, l.root.next
	l.root.next.prev = e
	l.root.next = e
}

func (l *lru) remove(e *entry) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
}

func (l *lru) touch(e *entry) {
	if l.root.next != e {
		l.remove(e)
		l.pushFront(e)
	}
}

// oldest returns the least recently used entry, or nil for an empty list.
func (l *lru) oldest() *entry {
	if l.root.prev == &l.root {
		return nil
	}
	return l.root.prev
}
