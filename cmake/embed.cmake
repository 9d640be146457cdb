# Turns the file IN into a C header OUT defining `static const char saga_schema_sql[]`.
file(READ ${IN} content HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," content "${content}")
file(WRITE ${OUT} "/* Generated from schema.sql; do not edit. */\n"
  "static const char saga_schema_sql[] = {${content} 0x00};\n")
