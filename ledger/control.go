package ledger

import (
	"fmt"
	"math"
	"slices"
	"sync/atomic"
	"time"

	"github.com/pagedkv/pagedkv/internal/names"
)

// MemberInfo is one member as the ledger records it.
type MemberInfo struct {
	Slot         int
	Name         string
	PID          int
	Mapped       uint64 // bytes it holds
	AllowCompact bool
	Joined       time.Time
	Usage        Usage
}

// Snapshot is the whole ledger at one moment, read under its lock.
type Snapshot struct {
	Limit, Used, DeviceBytes uint64
	Members                  []MemberInfo // by slot
	Reaped                   []string     // members of dead processes freed by this read
}

// Snapshot reaps members whose process died and returns the limit and every member.
func (l *Ledger) Snapshot() (_ Snapshot, err error) {
	g, err := l.enter("snapshot")
	if err != nil {
		return Snapshot{}, err
	}
	defer l.exit(g, &err)
	if err := l.lock(); err != nil {
		return Snapshot{}, err
	}
	defer l.unlock()
	s := Snapshot{Reaped: l.reapLocked(), Limit: atomic.LoadUint64(l.u64(hLimit)), DeviceBytes: atomic.LoadUint64(l.u64(hDevice))}
	for i := range MaxMembers {
		if atomic.LoadUint32(l.s32(i, sState)) != stateLive {
			continue
		}
		w := func(f int) uint64 { return atomic.LoadUint64(l.s64(i, sUsage+8*f)) }
		mi := MemberInfo{
			Slot: i, Name: l.nameOf(i), PID: int(atomic.LoadUint32(l.s32(i, sPID))),
			Mapped:       atomic.LoadUint64(l.s64(i, sMapped)),
			AllowCompact: atomic.LoadUint32(l.s32(i, sFlags))&flagCompact != 0,
			Joined:       time.Unix(0, int64(atomic.LoadUint64(l.s64(i, sJoined)))),
			Usage: Usage{
				Sequences: int(w(uSequences)), LiveBlocks: int(w(uLiveBlocks)), MappedPages: int(w(uMappedPages)),
				QueryTokens: w(uQueryTokens), HitTokens: w(uHitTokens), CachedBlocks: int(w(uCachedBlocks)),
				PageOverhead: math.Float64frombits(w(uOverhead)),
			},
		}
		if t := w(uUpdated); t != 0 {
			mi.Usage.Updated = time.Unix(0, int64(t))
		}
		s.Used = addSat(s.Used, mi.Mapped)
		s.Members = append(s.Members, mi)
	}
	return s, nil
}

// LimitReport says how far a change of the limit got.
type LimitReport struct {
	Limit uint64
	Used  uint64 // bytes the members hold after giving back what they could
	// Shortfall is Used - Limit when the members' live data needs more than the new limit (they
	// keep it; nobody maps a new page until usage falls under the limit), else 0.
	Shortfall uint64
}

// SetLimit changes the limit for every process at once. Lowering it below what the members
// hold asks them, largest first, for their free and cached pages, then asks those that allow
// it to compact, waiting for each (at most the request timeout for one in another process).
// A limit of 0 is ErrInvalidArgument and changes nothing.
func (l *Ledger) SetLimit(limit uint64) (_ LimitReport, err error) {
	g, err := l.enter("set limit")
	if err != nil {
		return LimitReport{}, err
	}
	defer l.exit(g, &err)
	if limit == 0 {
		return LimitReport{}, fmt.Errorf("ledger: set limit: %w: zero", ErrInvalidArgument)
	}
	if err := l.storeLimit(limit); err != nil {
		return LimitReport{}, err
	}
	if l.sumMapped() > limit {
		others, err := l.others(-1)
		if err != nil {
			return LimitReport{}, err
		}
		for _, compact := range []bool{false, true} {
			for _, o := range others {
				need := l.shortfall(0)
				if need == 0 {
					break
				}
				l.ask(o, kindReclaim, need, compact, true)
			}
		}
	}
	r := LimitReport{Limit: limit, Used: l.sumMapped()}
	if r.Used > limit {
		r.Shortfall = r.Used - limit
	}
	return r, nil
}

// storeLimit writes the limit under the ledger lock.
func (l *Ledger) storeLimit(limit uint64) error {
	if err := l.lock(); err != nil {
		return err
	}
	defer l.unlock() // also when the store faults
	atomic.StoreUint64(l.u64(hLimit), limit)
	return nil
}

// DropCache asks the member called name ("" for every member) to empty its prefix cache, and
// returns how many were asked. An unknown name is ErrNotFound.
func (l *Ledger) DropCache(name string) (_ int, err error) {
	s, err := l.Snapshot()
	if err != nil {
		return 0, err
	}
	g, err := l.enter("drop cache")
	if err != nil {
		return 0, err
	}
	defer l.exit(g, &err)
	n := 0
	for _, mi := range s.Members {
		if name == "" || mi.Name == name {
			l.ask(mi.Slot, kindDrop, 0, false, true)
			n++
		}
	}
	if n == 0 && name != "" {
		return 0, fmt.Errorf("ledger: drop cache of %q: %w", name, ErrNotFound)
	}
	return n, nil
}

// Check reaps members whose process died, then verifies the ledger's invariants under its lock:
// slots are free or live, a free slot holds no bytes, live names are valid and unique. Tests
// call it after concurrent use.
func (l *Ledger) Check() (err error) {
	g, err := l.enter("check")
	if err != nil {
		return err
	}
	defer l.exit(g, &err)
	if err := l.lock(); err != nil {
		return err
	}
	defer l.unlock()
	l.reapLocked()
	var seen []string
	for i := range MaxMembers {
		switch st := atomic.LoadUint32(l.s32(i, sState)); st {
		case stateFree:
			if b := atomic.LoadUint64(l.s64(i, sMapped)); b != 0 {
				return fmt.Errorf("ledger: slot %d is free but holds %d bytes", i, b)
			}
		case stateLive:
			n := l.nameOf(i)
			if err := names.Check("member", n); err != nil {
				return fmt.Errorf("ledger: slot %d is live with a bad name: %w", i, err)
			}
			if slices.Contains(seen, n) {
				return fmt.Errorf("ledger: name %q is live twice", n)
			}
			seen = append(seen, n)
		default:
			return fmt.Errorf("ledger: slot %d in state %d", i, st)
		}
	}
	return nil
}
