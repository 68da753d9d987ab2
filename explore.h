/* explore.h - ./run --explore FILE.html: the run as one self-contained HTML page (inline CSS and JavaScript,
 * the data embedded, nothing fetched) where a student points at a token and sees where each head looks,
 * the wiring of every layer, and what each layer's KV cache holds at that position. The page's source is
 * explore/page.html; docs/ATTENTION.md shows an example. */
#ifndef ATTN_EXPLORE_H
#define ATTN_EXPLORE_H

#include <stddef.h>

#include "model.h"
#include "study.h"

/* The limits of a page. Positions: prompt + generated tokens. Data: the embedded arrays before base64
 * (the file is about 4/3 of it): when the weights do not fit, the threshold below which a weight is left
 * out rises (the page says so); a run whose fixed part alone would not fit is refused before it starts.
 * A 1,000-token run of kjv-5m (6 layers x 8 heads) fits at the lowest threshold. */
#define EXPLORE_MAX_POSITIONS 2048
#define EXPLORE_MAX_DATA_BYTES (7u << 20)

typedef struct {
    const char *model_path;
    const char *command; /* the command line, shown in the page */
    const int *ids;      /* the prompt's ids, then the generated ones */
    int n_prompt, n_ids; /* n_ids may exceed the positions recorded by the last sampled token */
} ExploreRun;

/* Before the run (of at most EXPLORE_MAX_POSITIONS positions): 0 if a page can hold map's layers over
 * n_positions, else -1 with one line in err. */
int explore_check_size(const Model *m, const AttentionMap *map, int n_positions, char *err, size_t errlen);

/* Writes the page (a temporary file, renamed into place). Validates the weights first: finite, in [0, 1],
 * 0 where the mask hides a key, rows summing to 1, and after quantising each row read back within the
 * stated error. On failure writes one line to err and returns -1; path is then untouched. */
int explore_write(const char *path, const Model *m, const AttentionMap *map, const ExploreRun *run, char *err,
                  size_t errlen);

/* A row of weights (by key position 0 .. pos, 0 where masked) checked and quantised: writes the bitmap
 * (ceil(visible / 8) bytes) and codes (at most visible bytes), sets *max_weight and *n_codes; reads the
 * row back from what it wrote and checks it against the stated error. 0, or -1 with one line in err. */
int explore_quantise_row(const float *row, const AttentionSpec *a, int pos, float threshold, unsigned char *bitmap,
                         unsigned char *codes, float *max_weight, int *n_codes, char *err, size_t errlen);

/* The command line as one shell-quoted string (malloc'd; NULL when out of memory). */
char *explore_command_line(int argc, char **argv);

#endif
