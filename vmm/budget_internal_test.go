package vmm

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// A member name breaking the naming rule is refused with a *NameError, and the budget gets no
// member.
func TestBudgetJoinNames(t *testing.T) {
	b := NewBudget(1 << 20)
	for _, name := range []string{"", strings.Repeat("x", 64), strings.Repeat("\x00", 5000), "bad\xffutf8"} {
		_, err := b.Join(name, fakeReclaimer{})
		var ne *NameError
		require.ErrorAs(t, err, &ne, "%q", name)
		require.ErrorIs(t, err, ErrInvalidArgument)
		require.Equal(t, name, ne.Name)
		require.True(t, strings.HasPrefix(err.Error(), "budget: join: member name "), err.Error())
		require.Empty(t, b.members, "a refused name adds no member")
	}
	m, err := b.Join(strings.Repeat("x", 63), fakeReclaimer{})
	require.NoError(t, err)
	require.NoError(t, m.Acquire(1, false))
	require.Len(t, b.members, 1)
	m.Leave()
}

// giver is a member's reclaimer holding a free reserve, which it gives back through its member
// when asked.
type giver struct {
	m       *BudgetMember
	reserve uint64
}

func (g *giver) Reclaim(need uint64, compact, wait bool) uint64 {
	n := min(need, g.reserve)
	g.reserve -= n
	g.m.Release(n)
	return n
}

// An Acquire that would not fit even if every other member gave back all it holds fails with
// the numbers and takes nothing from them; one that reclaiming can satisfy still succeeds.
func TestBudgetAcquireBeyondOthers(t *testing.T) {
	b := NewBudget(10 << 20)
	g := &giver{reserve: 4 << 20}
	a, err := b.Join("a", g)
	require.NoError(t, err)
	g.m = a
	require.NoError(t, a.TryAcquire(4<<20))
	c, err := b.Join("c", fakeReclaimer{})
	require.NoError(t, err)
	require.NoError(t, c.TryAcquire(2<<20))

	err = c.Acquire(9<<20, true)
	var ce *CapacityError
	require.ErrorAs(t, err, &ce)
	require.Equal(t, CapacityError{Need: 9 << 20, Free: 4 << 20}, *ce)
	require.Equal(t, uint64(4<<20), a.Used(), "a's reserve was not taken for nothing")

	require.NoError(t, c.Acquire(8<<20, false))
	require.Zero(t, a.Used())
	require.Equal(t, uint64(10<<20), b.Used())
}
