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
