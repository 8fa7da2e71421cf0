package kvcache

import "github.com/pagedkv/pagedkv/prefix"

// Sizes of the arrays an eventSlab carves events' slices from: 32 KiB of keys and 64 KiB of
// token ids, one allocation per 1,024 blocks of events at 16 tokens a block.
const (
	slabKeys   = 1024
	slabTokens = 16384
)

// eventSlab hands out the keys and token ids of KV events as slices of large arrays, so that
// building an event on the append path allocates nothing (one allocation per full array). A
// slice handed out is never written again: it belongs to the event's readers, as prefix.Event
// says, and a full array is left to them and to the garbage collector. Guarded by the
// manager's mu.
type eventSlab struct {
	k []prefix.Key
	t []TokenID
}

// keys returns a copy of src that no later call writes.
func (s *eventSlab) keys(src []prefix.Key) []prefix.Key {
	if len(src) > cap(s.k)-len(s.k) {
		s.k = make([]prefix.Key, 0, max(slabKeys, len(src)))
	}
	n := len(s.k)
	s.k = append(s.k, src...)
	return s.k[n:len(s.k):len(s.k)]
}

// tokens returns a copy of src that no later call writes.
func (s *eventSlab) tokens(src []TokenID) []TokenID {
	if len(src) > cap(s.t)-len(s.t) {
		s.t = make([]TokenID, 0, max(slabTokens, len(src)))
	}
	n := len(s.t)
	s.t = append(s.t, src...)
	return s.t[n:len(s.t):len(s.t)]
}

// appendKey returns keys with k appended. When keys is the slice handed out last (the pending
// event's), it grows in place: nobody else can see past its end.
func (s *eventSlab) appendKey(keys []prefix.Key, k prefix.Key) []prefix.Key {
	n := len(s.k)
	if len(keys) > 0 && n > 0 && n < cap(s.k) && &keys[len(keys)-1] == &s.k[n-1] {
		s.k = append(s.k, k)
		return s.k[n-len(keys) : n+1 : n+1]
	}
	if len(keys)+1 > cap(s.k)-n { // room to double, so that a long run of removals copies O(n)
		s.k = make([]prefix.Key, 0, max(slabKeys, 2*(len(keys)+1)))
		n = 0
	}
	s.k = append(append(s.k, keys...), k)
	return s.k[n:len(s.k):len(s.k)]
}
