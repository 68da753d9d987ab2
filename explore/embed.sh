#!/bin/sh
# explore/embed.sh PAGE.html > page.h - the page ./run --explore writes, as a C array of string literals, one
# per line, ending with a null pointer: ./run carries the page, so it works from any directory. Written in
# POSIX sh + awk (no xxd); backslashes, double quotes and '?' (trigraphs under -std=c11) are escaped, tabs
# become \t, carriage returns are dropped.
set -e
LC_ALL=C awk '
BEGIN {
    print "/* generated from explore/page.html by explore/embed.sh: do not edit */"
    print "static const char *const explore_page_lines[] = {"
}
{
    out = ""
    for (i = 1; i <= length($0); i++) {
        c = substr($0, i, 1)
        if (c == "\\" || c == "\"" || c == "?") out = out "\\" c
        else if (c == "\t") out = out "\\t"
        else if (c != "\r") out = out c
    }
    printf "    \"%s\\n\",\n", out
}
END {
    print "    0"
    print "};"
}' "$1"
