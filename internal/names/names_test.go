package names_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/errdefs"
	"github.com/pagedkv/pagedkv/internal/names"
)

func TestCheck(t *testing.T) {
	for _, name := range []string{"a", "llama-3.1-8b/instruct", strings.Repeat("x", names.Max), "模型", "with space"} {
		require.NoError(t, names.Check("model", name), "%q", name)
	}
	for _, c := range []struct{ name, text string }{
		{"", `model name "" is empty`},
		{strings.Repeat("x", names.Max+1), `model name "xxxxxxxxxxxxxxxxxxxxxxxx"... (64 bytes) is longer than 63 bytes`},
		{strings.Repeat("\x00", 5000), `model name "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"... (5000 bytes) is longer than 63 bytes`},
		{"a\xffb", `model name "a\xffb" is not valid UTF-8`},
		{"a\x00b", `model name "a\x00b" has a control character (U+0000) at byte 1`},
		{"tab\there", `model name "tab\there" has a control character (U+0009) at byte 3`},
		{"del\x7f", `model name "del\x7f" has a control character (U+007F) at byte 3`},
		{"c1\u0085", `model name "c1\u0085" has a control character (U+0085) at byte 2`},
	} {
		err := names.Check("model", c.name)
		var ne *errdefs.NameError
		require.ErrorAs(t, err, &ne, "%q", c.name)
		require.Equal(t, c.name, ne.Name)
		require.True(t, errors.Is(err, errdefs.ErrInvalidArgument))
		require.Equal(t, c.text, err.Error())
	}
}
