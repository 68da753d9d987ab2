/* chat.h - chat templates: the model file's chat section (docs/FORMAT.md) and the Jinja subset that Hugging
 * Face chat templates are written in, interpreted here (docs/CHAT.md). A conversation is rendered the way
 * transformers' apply_chat_template renders it: the same Jinja environment (trim_blocks, lstrip_blocks,
 * loop controls, raise_exception, strftime_now, a tojson that keeps non-ASCII characters), the special-token
 * strings of tokenizer_config.json as variables, tools and documents none. */
#ifndef ATTN_CHAT_H
#define ATTN_CHAT_H

#include <stddef.h>

#define CHAT_MAX_VARIABLES 16

typedef struct {
    const char *name, *value; /* pointing into the model file; value_len bytes, no NUL inside */
    int name_len, value_len;
} ChatVariable;

/* The chat section of a model file: a template and the string variables it reads (bos_token, ...). */
typedef struct {
    const char *template_text; /* NULL: the file has no chat template */
    size_t template_len;
    int n_variables;
    ChatVariable variables[CHAT_MAX_VARIABLES];
} ChatSection;

/* Parses and checks the section (size bytes at data). size 0: no template. 0, or -1 with one line in err. */
int chat_section_load(ChatSection *chat, const unsigned char *data, size_t size, char *err, size_t errlen);

typedef struct {
    const char *role;
    const char *content;
    size_t content_len;
} ChatMessage;

/* The prompt the template renders for these messages (and, when add_generation_prompt, the opening of the
 * assistant's turn): malloc'd, NUL-terminated, *len bytes. A template that drops or refuses a system message
 * gets it put before the first user message instead (system + "\n" + user), as llama.cpp does. NULL with one
 * line in err when the template fails (a construct outside the subset, raise_exception, a limit). */
char *chat_render(const ChatSection *chat, const ChatMessage *messages, int n, int add_generation_prompt, size_t *len,
                  char *err, size_t errlen);
/* The same with the messages as JSON text: a list of objects such as {"role": "user", "content": "Hi"}; every
 * key of an object reaches the template (message.tool_calls, ...). */
char *chat_render_json(const ChatSection *chat, const char *json, size_t json_len, int add_generation_prompt,
                       size_t *len, char *err, size_t errlen);

/* Where an assistant turn ends in the template: the text that follows the assistant's words, e.g. "<|im_end|>\n"
 * (malloc'd in *text, *len bytes). 0, or -1 with one line in err. */
int chat_turn_end(const ChatSection *chat, char **text, size_t *len, char *err, size_t errlen);

#endif
