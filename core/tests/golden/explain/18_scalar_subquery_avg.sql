SELECT song_name FROM singer WHERE age  >  (SELECT avg(age) FROM singer)
