package kvevents

import (
	"encoding/binary"
	"sync"

	"github.com/go-zeromq/zmq4"
)

// endMarker is the sequence number that ends a replay: -1 as 8 bytes big-endian, sent with an
// empty payload.
var endMarker = []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// entry is one batch kept for replay.
type entry struct {
	seq     uint64
	payload []byte
}

// ring keeps the newest batches, at most max of them and maxBytes of payload (the newest one
// whatever its size). Safe for concurrent use.
type ring struct {
	mu       sync.Mutex // mu guards the following
	buf      []entry    // kept entries are buf[head:], oldest first
	head     int
	bytes    int
	max      int
	maxBytes int
}

func (r *ring) add(seq uint64, payload []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf = append(r.buf, entry{seq, payload})
	r.bytes += len(payload)
	for n := len(r.buf) - r.head; n > 1 && (n > r.max || r.bytes > r.maxBytes); n-- {
		r.bytes -= len(r.buf[r.head].payload)
		r.buf[r.head] = entry{}
		r.head++
	}
	if r.head > len(r.buf)/2 { // move the kept entries down, so that buf stays within 2x of them
		n := copy(r.buf, r.buf[r.head:])
		clear(r.buf[n:])
		r.buf, r.head = r.buf[:n], 0
	}
}

func (r *ring) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.buf) - r.head
}

// from appends to dst the entries with sequence numbers from start on, oldest first.
func (r *ring) from(start uint64, dst []entry) []entry {
	r.mu.Lock()
	defer r.mu.Unlock()
	kept := r.buf[r.head:]
	if len(kept) == 0 || start > kept[len(kept)-1].seq {
		return dst
	}
	skip := 0
	if start > kept[0].seq { // sequence numbers are consecutive
		skip = int(start - kept[0].seq)
	}
	return append(dst, kept[skip:]...)
}

// serveReplay answers replay requests until the socket closes.
func (p *Publisher) serveReplay() {
	defer p.wg.Done()
	var batches []entry
	for {
		msg, err := p.rep.Recv()
		if err != nil {
			if p.isClosed() {
				return
			}
			p.fail(err)
			continue
		}
		batches = p.replay(msg.Frames, batches[:0])
		clear(batches)
	}
}

// replay answers one request: every buffered batch from the start sequence number on as
// [seq, payload], then the end marker with an empty payload, each behind the requester's
// envelope. A malformed request is counted and reported, and gets no answer.
func (p *Publisher) replay(frames [][]byte, batches []entry) []entry {
	if bad := checkRequest(frames); bad != nil {
		p.stats.badRequests.Add(1)
		p.report(bad)
		return batches
	}
	id := frames[0]
	batches = p.ring.from(binary.BigEndian.Uint64(frames[2]), batches)
	for _, b := range batches {
		seq := binary.BigEndian.AppendUint64(make([]byte, 0, 8), b.seq)
		if err := p.rep.Send(zmq4.NewMsgFrom(id, nil, seq, b.payload)); err != nil {
			p.fail(err)
			return batches
		}
	}
	p.stats.replays.Add(1) // before the end marker: a client that has it sees the count
	if err := p.rep.Send(zmq4.NewMsgFrom(id, nil, endMarker, nil)); err != nil {
		p.fail(err)
	}
	return batches
}

// checkRequest returns a *RequestError unless frames are [identity, "", 8-byte start].
func checkRequest(frames [][]byte) *RequestError {
	e := &RequestError{Frames: len(frames), Start: -1}
	if len(frames) > 0 {
		e.Start = len(frames[len(frames)-1])
	}
	switch {
	case len(frames) != 3:
		e.Reason = "want the empty delimiter and the start sequence number"
	case len(frames[1]) != 0:
		e.Reason = "the delimiter frame is not empty"
	case len(frames[2]) != 8:
		e.Reason = "the start sequence number is not 8 bytes"
	default:
		return nil
	}
	return e
}
