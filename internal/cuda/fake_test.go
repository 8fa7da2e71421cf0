package cuda

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The fake driver answers through the same entry points as libcuda, and records a call made
// with no context or after the context's last release.
func TestFakeDriver(t *testing.T) {
	f := &Fake{}
	t.Cleanup(InstallFake(f))
	require.NoError(t, Load())
	n, err := DeviceCount()
	require.NoError(t, err)
	assert.Equal(t, 1, n)
	name, err := DeviceName(0)
	require.NoError(t, err)
	assert.Equal(t, "Fake GPU", name)
	c, err := RetainPrimaryContext(0)
	require.NoError(t, err)
	h, err := c.MemCreate(2 << 20)
	require.NoError(t, err)
	assert.Equal(t, 1, f.Live("handle"))
	require.NoError(t, c.MemRelease(h))
	assert.Equal(t, 0, f.Live("handle"))
	require.NoError(t, c.Release())
	assert.Empty(t, f.Misuse())
	_, _, err = c.MemGetInfo()
	require.Error(t, err)
	assert.NotEmpty(t, f.Misuse())
}
