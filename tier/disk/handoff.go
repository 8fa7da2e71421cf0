package disk

import "sync/atomic"

// handoff passes a growing count of finished items from a producer goroutine to a consumer on
// another, so that one does the I/O while the other does the checksums: what the producer did
// to the items below a count happens before the consumer sees the count. With two CPUs, a
// third goroutine blocked in I/O would hold the CPU the checksums need.
type handoff struct {
	v    atomic.Int64  // the count << 1, | 1 once the producer is done
	bell chan struct{} // rung after v changes; one ring is pending at most
}

// newHandoff returns a handoff at count 0.
func newHandoff() *handoff { return &handoff{bell: make(chan struct{}, 1)} }

// publish raises the count to n, marks the producer done where last is set, and wakes the
// consumer.
func (h *handoff) publish(n int, last bool) {
	v := int64(n) << 1
	if last {
		v |= 1
	}
	h.v.Store(v)
	select {
	case h.bell <- struct{}{}:
	default:
	}
}

// wait returns the count once it exceeds have or the producer is done, and whether it is.
func (h *handoff) wait(have int) (int, bool) {
	for {
		v := h.v.Load()
		if n, last := int(v>>1), v&1 == 1; n > have || last {
			return n, last
		}
		<-h.bell
	}
}

// encodeQueue shares the encoding of a run's records between the goroutine that writes them
// and a helper: each claims the next record, encodes it and marks it done; the writer writes
// the records in order, each once it is done. A writer that finds the next record not done
// encodes one itself instead of waiting for a helper that may wait for a CPU.
type encodeQueue struct {
	next atomic.Int64  // the next record to claim
	done []atomic.Bool // the records encoded
	bell chan struct{} // rung after a record is done; one ring is pending at most
}

// reset readies q for a run of n records.
func (q *encodeQueue) reset(n int) {
	if cap(q.done) < n {
		q.done = make([]atomic.Bool, n)
	}
	q.done = q.done[:n]
	for i := range q.done {
		q.done[i].Store(false)
	}
	q.next.Store(0)
	select {
	case <-q.bell:
	default:
	}
}

// claim returns the next record to encode, or -1 where every record is claimed.
func (q *encodeQueue) claim() int {
	if i := int(q.next.Add(1) - 1); i < len(q.done) {
		return i
	}
	return -1
}

// finish marks record i encoded and wakes the writer.
func (q *encodeQueue) finish(i int) {
	q.done[i].Store(true)
	select {
	case q.bell <- struct{}{}:
	default:
	}
}

// encoded reports whether record i is encoded.
func (q *encodeQueue) encoded(i int) bool { return q.done[i].Load() }

// wait returns after a record is done, or at once where one was done since the last wait.
func (q *encodeQueue) wait() { <-q.bell }
