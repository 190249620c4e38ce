"""Options of `llmcli env`."""

from __future__ import annotations

from dataclasses import dataclass

from llmcli.options.fields import Options, option


@dataclass(frozen=True, kw_only=True)
class EnvOptions(Options):
    """Print what a bug report needs: versions of llmcli, Python, torch and the key libraries, the
    device, CPU threads and where data is cached.

    Paste the output into the issue. Secrets are never printed (LLMCLI_API_KEY shows as "set").

    Examples:

      llmcli env

      llmcli env --json
    """

    json_out: bool = option(False, "--json", help="One JSON object instead of the list.")
