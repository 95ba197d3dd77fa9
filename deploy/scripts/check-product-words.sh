#!/usr/bin/env bash
# Fails when a product file speaks of the project's history or of documents outside the repository
# (a numbered work session, stop, tracker issue or seed document, or a section sign citing an outside
# contract) instead of the product itself.
# History belongs in git; a measured figure cites the commit it was measured on.
#
#   deploy/scripts/check-product-words.sh            # every tracked file
#   deploy/scripts/check-product-words.sh FILE...     # just these files
set -euo pipefail
cd "$(dirname "$0")/../.."

pattern='\b(sessions?|stops?|issues?|seeds?|tasks?) ?#?[0-9]+\b|§ ?[0-9]|\b(this|that|the previous|the next|an earlier|a later|start-of|end-of)[- ]session\b|\b(peers|reliability|design-sketch|ecosystem|perf-anchors|openai-batch-contract)\.md\b|\bthe brief\b|\bthe (issue|seed|contract)\x27s\b'

if [[ $# -gt 0 ]]; then
  files=("$@")
else
  # Lock files and the fuzz corpus are generated.
  mapfile -t files < <(git ls-files -- . ':!fuzz/corpus/' ':!*.lock' ':!*package-lock.json' | while read -r f; do [[ -f $f ]] && echo "$f"; done)
fi

if grep -nIiP -- "$pattern" "${files[@]}"; then
  echo "check-product-words: the lines above speak of history or outside documents; describe the product (and cite a commit for a figure) instead" >&2
  exit 1
fi
echo "check-product-words: ${#files[@]} files speak of the product alone"
