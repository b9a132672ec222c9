"""Cut the input lists into pieces and number their rows and chunks, from metadata alone.

A piece is what one worker reads (see input_lists): a run of parquet row groups holding at least
one chunk's rows, a byte range of a jsonl file, or a whole csv/tsv file. Row ids run through the
files in order and through each piece in order; a piece's rows fill work chunks of `chunk_size`
rows, the last one of each piece possibly shorter (chunks never span pieces, so each chunk is
written by exactly one worker). The launcher holds one small descriptor per piece, never a row.
"""

from __future__ import annotations

from dataclasses import replace

from vlforge.pipeline.input_lists import ListFile, Piece

# A jsonl piece: large enough that per-piece overhead is small, small enough to spread widely.
JSONL_PIECE_BYTES = 32 * 1024 * 1024


def plan_pieces(
    files: list[ListFile], chunk_size: int, jsonl_bytes: int = JSONL_PIECE_BYTES
) -> list[Piece]:
    """Pieces of every list, in row order; csv/tsv/jsonl pieces still to be counted."""
    pieces: list[Piece] = []

    def add(**fields) -> None:
        pieces.append(Piece(index=len(pieces), **fields))

    for f in files:
        common = {"path": f.path, "fmt": f.fmt, "columns": f.columns}
        if f.fmt == "parquet":
            start, rows = 0, 0
            for i, n in enumerate(f.row_groups):
                rows += n
                if rows >= chunk_size or i == len(f.row_groups) - 1:
                    add(**common, n_rows=rows, row_groups=(start, i + 1))
                    start, rows = i + 1, 0
        elif f.fmt == "jsonl":
            for start in range(0, max(f.size, 1), jsonl_bytes):
                add(**common, byte_range=(start, min(f.size, start + jsonl_bytes)))
        else:
            add(**common)
    return pieces


def number_pieces(pieces: list[Piece], chunk_size: int) -> tuple[list[Piece], int, int]:
    """Counted pieces with their first row id and first chunk; (pieces, rows, chunks) in all."""
    numbered, rows, chunks = [], 0, 0
    for piece in pieces:
        if piece.n_rows < 0:
            raise ValueError(f"piece {piece.index} of {piece.path} is not counted")
        numbered.append(replace(piece, first_row=rows, first_chunk=chunks))
        rows += piece.n_rows
        chunks += -(-piece.n_rows // chunk_size)
    return numbered, rows, chunks


def chunk_of(piece: Piece, row_id: int, chunk_size: int) -> int:
    """The work chunk a row of `piece` is written to."""
    return piece.first_chunk + (row_id - piece.first_row) // chunk_size
