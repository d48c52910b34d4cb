SELECT name ,  country FROM singer WHERE song_name LIKE '%Hey%'
