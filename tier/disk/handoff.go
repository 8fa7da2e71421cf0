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

// reset readies h for a new producer and consumer.
func (h *handoff) reset() {
	h.v.Store(0)
	select {
	case <-h.bell:
	default:
	}
}

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
